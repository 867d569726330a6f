"""`gate()` / `check()` at the top of a training script leave the caller's process as they found it:
its environment, vLLM's cache of it and vLLM's logging, so that the trainer's own engine, built later
in the same process, is built with the trainer's settings and not lora-doctor's."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from caller_process import MARK
from conftest import BASE, CHECKPOINT, ROOT
from hygiene import share_compile_cache
from processes import run_process

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)

SCRIPT = ROOT / "tests" / "caller_process.py"
GIB = 1 << 30


@pytest.fixture
def caller_tmp() -> Iterator[Path]:
    """The caller's temporary folder, removed after the test: the trainer's engine, which the script
    leaves running as it exits, leaves vLLM's sockets there. A short path: a socket's must fit in 107
    characters, which a test's own tmp_path does not leave room for."""
    folder = Path(tempfile.mkdtemp(prefix="caller-"))
    share_compile_cache(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def caller_environment(tmp: Path) -> dict[str, str]:
    """A caller's process: none of the session's VLLM_* variables; its temporary files in `tmp`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("VLLM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE", TMPDIR=str(tmp))
    return env


def run_caller_script(script: str, tmp: Path) -> dict:
    """A caller's own Python script, in a fresh process; what it printed after the mark."""
    done = run_process([sys.executable, "-c", script], env=caller_environment(tmp), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARK)).removeprefix(MARK))


def test_an_engine_built_after_the_gate_has_the_callers_settings(caller_tmp):
    # The caller's process: its own KV cache size, vLLM's defaults for everything else (multiprocessing
    # on, INFO logging), none of the variables the test session sets for its in-process engines.
    env = dict(caller_environment(caller_tmp), VLLM_CPU_KVCACHE_SPACE="2")
    done = run_process([sys.executable, str(SCRIPT), str(CHECKPOINT), str(BASE)], env=env, timeout=900)
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


def test_a_check_that_fails_while_measuring_the_noise_still_closes_its_engine(caller_tmp):
    # The noise measurement runs out of memory for real (no address space left to map); the engine,
    # started just before, must be closed: the caller gets its logging and torch's threads back.
    script = (
        "import json, logging, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import vllm\n"
        "from failing_engine_plans import no_memory_left\n"
        "from lora_doctor import EnvironmentProblem, check\n"
        "from lora_doctor.measure.phase import PhaseMeasurer\n"
        "original = PhaseMeasurer.measure_noise\n"
        "def arranged(self, engine):\n"
        "    with no_memory_left():\n"
        "        return original(self, engine)\n"
        "PhaseMeasurer.measure_noise = arranged\n"
        "logger = logging.getLogger('vllm')\n"
        "before = (logger.level, list(logger.handlers), torch.set_num_threads)\n"
        "try:\n"
        f"    check({str(CHECKPOINT)!r}, plan='merged')\n"
        "    raised = None\n"
        "except EnvironmentProblem as error:\n"
        "    raised = str(error)\n"
        "after = (logger.level, list(logger.handlers), torch.set_num_threads)\n"
        "print('caller-process: ' + json.dumps({'raised': raised, 'closed': after == before}), flush=True)\n"
    )
    seen = run_caller_script(script, caller_tmp)
    assert seen["raised"] is not None and seen["closed"] is True, seen


def test_a_check_run_beside_the_trainers_in_process_engine_leaves_it_serving(caller_tmp):
    # The trainer's engine runs in-process (as TRL's colocated one does) when the script calls `check()`:
    # closing lora-doctor's engine must not take down the parallel state the trainer's engine shares
    # (vLLM's shutdown destroys it; the trainer's next request would fail).
    script = (
        "import json, os\n"
        "os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'\n"
        "os.environ['VLLM_CPU_KVCACHE_SPACE'] = '1'\n"
        "from vllm import LLM, SamplingParams\n"
        "from lora_doctor import check\n"
        f"trainer = LLM(model={str(BASE)!r}, dtype='float32', max_model_len=256, enforce_eager=True)\n"
        "params = SamplingParams(max_tokens=8, temperature=0.0)\n"
        "before = trainer.generate(['The capital of France is'], params, use_tqdm=False)[0].outputs[0].token_ids\n"
        f"report = check({str(CHECKPOINT)!r}, plan='merged')\n"
        "after = trainer.generate(['The capital of France is'], params, use_tqdm=False)[0].outputs[0].token_ids\n"
        "print('caller-process: ' + json.dumps({'verdict': report.verdict, 'before': list(before), 'after': list(after)}), flush=True)\n"
    )
    seen = run_caller_script(script, caller_tmp)
    assert seen["verdict"] == "pass"
    assert len(seen["before"]) == 8 and seen["after"] == seen["before"]
