"""Every process a test starts runs in a process group of its own and is killed whole when it overruns
(or when the test itself is stopped by its time limit): vLLM's workers and a trainer's engine never
outlive the test that started them."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_process(command: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `command` to its end (text output captured); past `timeout` seconds, kill its whole group
    and raise `subprocess.TimeoutExpired`."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        # A timeout here, or the test's own time limit interrupting the wait: nothing of the group survives.
        kill_group(process)
        raise
    kill_group(process)  # what the command left running in the background
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
