"""Shared fixtures: the bundled model and adapter, and ways to run the real CLI."""

from __future__ import annotations

import json
import os

# Before torch loads: see lora_doctor/__init__.py (OpenMP threads spinning beside the engine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Before anything creates a temporary file: the run's own temporary folder (TMPDIR), checked at its end.
from hygiene import pytest_sessionfinish, pytest_unconfigure  # noqa: E402, F401
from processes import run_process  # noqa: E402

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
SESSION_ENV = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST_")}


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI or script run: the session's, the engine's, then the test's own."""
    return {**SESSION_ENV, **ENGINE_ENV, **(extra or {})}


@contextmanager
def engine_environment(extra: dict[str, str] | None = None) -> Iterator[None]:
    """ENGINE_ENV (then `extra`) while a test builds its own engine or runs the CLI, the session's
    variables again afterwards."""
    saved = dict(os.environ)
    os.environ.update({**ENGINE_ENV, **(extra or {})})
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


def run_cli_process(*args: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> CliRun:
    """Run `lora-doctor` as a user does: a fresh process, real engine, real exit code. Kept for what only
    a process of its own shows (the engine's own output kept off the terminal, tensor-parallel workers);
    everything else goes through `run_cli`, which pays no interpreter, torch and vLLM start-up."""
    done = run_process([sys.executable, "-m", "lora_doctor", *map(str, args)], env=subprocess_env(env), timeout=timeout)
    return CliRun(done.returncode, done.stdout, done.stderr)


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> CliRun:
    """`lora-doctor ARGS` in this process: the CLI's own `main` (argument parsing, the library, the
    renderers, its exception-to-exit-code mapping), with the environment a CLI run gets, as a training
    script calls it; what it wrote to file descriptors 1 and 2 (as a process's caller sees them: the
    engine's own output goes to lora-doctor's log, as in a process of its own) and its exit code. Its
    engine is built and closed in this process, beside the session's (which lora-doctor leaves
    serving: tests/test_caller_process.py)."""
    from lora_doctor import cli

    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = ["lora-doctor", *map(str, args)]
    os.chdir(ROOT)
    try:
        with engine_environment(env), descriptors_captured() as captured:
            try:
                cli.main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    return CliRun(code, *captured.texts())


class Descriptors:
    """What was written to descriptors 1 and 2 while they pointed at two temporary files."""

    def __init__(self):
        self.files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())

    def texts(self) -> tuple[str, str]:
        out = []
        for file in self.files:
            file.seek(0)
            out.append(file.read().decode(errors="replace"))
            file.close()
        return out[0], out[1]


@contextmanager
def descriptors_captured() -> Iterator[Descriptors]:
    """Descriptors 1 and 2 into files for the block, and `sys.stdout` / `sys.stderr` writing to them."""
    captured = Descriptors()
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    for fd, file in zip((1, 2), captured.files):
        os.dup2(file.fileno(), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False, buffering=1), open(2, "w", closefd=False, buffering=1)
    try:
        yield captured
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


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


USER_ENGINES: list = []


def user_engine(model: Path, dtype: str):
    """An engine as a user builds it for lora-doctor: in-process, LoRA enabled, full-vocabulary
    log-probs, lora-doctor's worker extension, vLLM's defaults for the rest (prefix caching on, as in
    the trainers' engines: a test that syncs by hand resets the cache after, as they do). Kept for the
    whole session and shut down at its end: a finalized in-process engine tears down vLLM's
    process-wide parallel state under the engines still in use."""
    import gc

    from vllm import LLM

    # An engine dropped earlier is finalized now, before this one sets the parallel state up.
    gc.collect()
    with engine_environment():
        llm = LLM(
            model=str(model),
            dtype=dtype,
            enable_lora=True,
            max_lora_rank=8,
            max_model_len=256,
            enforce_eager=True,
            max_logprobs=-1,
            worker_extension_cls="lora_doctor.engine.worker.LoraDoctorWorker",
        )
    USER_ENGINES.append(llm)
    return llm


@pytest.fixture(scope="session", autouse=True)
def user_engines_shut_down_at_the_end():
    """After every other session fixture: the users' engines go, and vLLM's parallel state with them."""
    yield
    while USER_ENGINES:
        USER_ENGINES.pop().llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def user_llm():
    """The user's (or trainer's) own engine on the fixture base, shared by the live tests."""
    return user_engine(BASE, "float32")


def sync_weights(llm, weights) -> None:
    """A trainer's push of full weights into its engine: reload, then reset the prefix cache (TRL and
    ms-swift reset it after every sync)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
    llm.reset_prefix_cache()


@dataclass
class DefaultCheck:
    run: CliRun
    json_path: Path
    report_dir: Path

    @property
    def report(self) -> dict:
        return json.loads(self.json_path.read_text())


@pytest.fixture(scope="session")
def default_check(tmp_path_factory) -> DefaultCheck:
    """`lora-doctor check` on the fixture with every default (the #8233 double count), as the README's
    demo runs it: a process of its own, its JSON report and its report folder. Shared by the tests of
    the command's contract and of the renderers. Its KV cache comes from the environment (no option):
    3 GiB, where the engine's own default is 1 (test_exit_codes.py reads it back)."""
    out = tmp_path_factory.mktemp("default-check")
    run = run_cli_process("check", CHECKPOINT, "--json", out / "report.json", "--report", out / "report", env={"VLLM_CPU_KVCACHE_SPACE": "3"})
    return DefaultCheck(run, out / "report.json", out / "report")


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
