"""`gate()` / `check()` at the top of a training script leave the caller's process as they found it:
its environment, vLLM's cache of it and vLLM's logging, so that the trainer's own engine, built later
in the same process, is built with the trainer's settings and not lora-doctor's."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from caller_process import MARK
from conftest import BASE, CHECKPOINT, ROOT

SCRIPT = ROOT / "tests" / "caller_process.py"
GIB = 1 << 30


def test_an_engine_built_after_the_gate_has_the_callers_settings():
    # The caller's process: its own KV cache size, vLLM's defaults for everything else (multiprocessing
    # on, INFO logging), none of the variables the test session sets for its in-process engines.
    env = {name: value for name, value in os.environ.items() if not name.startswith("VLLM_")}
    env.update(VLLM_CPU_KVCACHE_SPACE="2", PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, str(SCRIPT), str(CHECKPOINT), str(BASE)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARK)).removeprefix(MARK))
    # lora-doctor's engine was built its own way: the option's 1 GiB, not the caller's 2.
    assert seen["gate_verdict"] == "pass" and seen["gate_kv_cache_gib"] == 1
    assert seen["vllm_before"] == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    # Every variable, lora-doctor's and those vLLM sets as it builds an engine; torch's threads.
    assert seen["environment_changed"] == [] and seen["torch_as_found"] is True
    assert seen["envs_cached_after_gate"] is False
    assert seen["logging_as_found"] is True
    # The trainer's engine: the caller's KV cache and vLLM's default multiprocess engine core, where
    # lora-doctor's settings would have given 1 GiB and an in-process core (InprocClient).
    assert seen["trainer_kv_cache_bytes"] == 2 * GIB
    assert seen["trainer_engine_client"] == "SyncMPClient"
    # and vLLM's logging at the caller's level (INFO: no VLLM_LOGGING_LEVEL), where lora-doctor's is ERROR.
    assert seen["trainer_log_level"] == logging.INFO
