"""Runs of tests/trl_watch.py for the watch's tests: one fresh process per run, as a user starts one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, ROOT, subprocess_env
from processes import run_process

# A whole trainer run (engine start, first compile of vLLM's sampler, six steps, the probes).
RUN_TIMEOUT = 900
BREAK_STEP = 4
STEPS = 6
QUIET_ADAPTER = FIXTURES / "checkpoint-500-1e-2"


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def watched_run(tmp_path: Path, mode: str, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    results = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "tests" / "trl_watch.py"), mode, str(tmp_path / "run"), "--json", str(results), "--steps", str(STEPS), *options]
    # TRL's colocated engine joins a torch.distributed group: a port of its own, as two test modules run at once.
    done = run_process(command, env=subprocess_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}), timeout=RUN_TIMEOUT)
    print(done.stdout)
    assert results.is_file(), done.stderr[-3000:]
    return done, json.loads(results.read_text())


def by_step(data: dict) -> dict[int, dict]:
    return {record["step"]: record for record in data["records"]}


def trl_gap(data: dict, step: int) -> float:
    return data["trl_logp_difference_mean"][str(step)]
