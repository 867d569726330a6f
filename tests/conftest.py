"""Shared fixtures: the bundled model and adapter, and a way to run the real CLI."""

from __future__ import annotations

import json
import os

# Before torch loads: see lora_doctor/__init__.py (OpenMP threads spinning beside the engine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint-500"
BASE = FIXTURES / "tiny-qwen2"
PROMPTS = FIXTURES / "prompts.jsonl"
# An older state of the same LoRA run (for the stale-adapter plans).
PREVIOUS = FIXTURES / "checkpoint-250"
# A Llama base with an rsLoRA adapter (r=16).
LLAMA_RSLORA = FIXTURES / "checkpoint-llama-rslora"

# The engine runs in-process, with a small KV cache (the CPU default reserves most of the memory).
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
# The environment the session started with: a subprocess gets it, never what an in-process engine
# (vLLM sets variables of its own as it builds one) or a test left in os.environ.
SESSION_ENV = dict(os.environ)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI or script run: the session's, the engine's, then the test's own."""
    return {**SESSION_ENV, **ENGINE_ENV, **(extra or {})}


@contextmanager
def engine_environment() -> Iterator[None]:
    """ENGINE_ENV while a test builds its own engine, the session's variables again afterwards."""
    saved = dict(os.environ)
    os.environ.update(ENGINE_ENV)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_vllm_variables_left_behind():
    """No test leaves a VLLM_* variable behind for the tests after it (and their CLI runs)."""
    yield
    left = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") and SESSION_ENV.get(k) != v}
    assert not left, f"VLLM_* variables left in os.environ: {left}"


@dataclass
class CliRun:
    exit_code: int
    stdout: str
    stderr: str

    def report(self, path: Path) -> dict:
        return json.loads(path.read_text())


def run_cli(*args: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> CliRun:
    """Run `lora-doctor` as a user does: a fresh process, real engine, real exit code."""
    done = subprocess.run(
        [sys.executable, "-m", "lora_doctor", *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(env),
        cwd=ROOT,
        timeout=timeout,
    )
    return CliRun(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(run: CliRun, exit_code: int, needle: str, unwritten: Path | None = None) -> str:
    """The contract for every error: its exit code, one stderr line, no traceback, nothing written."""
    assert run.exit_code == exit_code, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert needle in lines[0], lines[0]
    if unwritten is not None:
        assert not unwritten.exists()
    return lines[0]


def adapter_modules(adapter: Path) -> set[str]:
    """The adapter's LoRA modules, named as reports name them: a per-module list must cover them all
    (an `all(...)` over an empty list would pass)."""
    from lora_doctor.adapter.lora_delta import load_lora_factors

    return set(load_lora_factors(adapter))


def layer_modules(layers) -> set[str]:
    """Module names of a phase's per-module results (objects or JSON dicts)."""
    return {layer["module"] if isinstance(layer, dict) else layer.module for layer in layers}


def user_engine(model: Path, dtype: str):
    """An engine as a user builds it for lora-doctor: in-process, LoRA enabled, full-vocabulary
    log-probs, lora-doctor's worker extension. Keep it for the whole session: a finalized in-process
    engine tears down vLLM's process-wide parallel state under the engines still in use."""
    import gc

    from vllm import LLM

    # An engine dropped earlier is finalized now, before this one sets the parallel state up.
    gc.collect()
    with engine_environment():
        return LLM(
            model=str(model),
            dtype=dtype,
            enable_lora=True,
            max_lora_rank=8,
            max_model_len=256,
            enforce_eager=True,
            enable_prefix_caching=False,
            max_logprobs=-1,
            worker_extension_cls="lora_doctor.engine.worker.LoraDoctorWorker",
        )


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    return CHECKPOINT


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return BASE


@pytest.fixture(scope="session")
def checker():
    """One in-process engine on the fixture for every library-level test (engines are slow to start)."""
    from lora_doctor import Checker

    # lora-doctor sets what its engine needs while it builds it, and leaves os.environ as it was.
    with Checker(CHECKPOINT, previous=PREVIOUS, prompts=PROMPTS) as shared:
        yield shared
