"""Custom sync plans for the exit code of what fails after start-up (tests/test_run_outcome.py): the
plan's own code (2), lora-doctor's code reached through the plan (4), the adapter vLLM refuses (2),
the engine dying under the plan (3: its tensor-parallel workers are killed for real)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path


def merges(sync):
    """A healthy plan: whatever fails under it is lora-doctor's or the engine's."""
    sync.load_merged()
    sync.probe("full-merged")


def adds_a_broken_adapter(sync):
    """An adapter folder whose config is fine and whose weights file is not a safetensors file."""
    folder = Path(tempfile.mkdtemp(prefix="broken-adapter-"))
    try:
        shutil.copy(sync.checkpoint.adapter_dir / "adapter_config.json", folder)
        (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        sync.add_adapter(weights=folder)
    finally:
        shutil.rmtree(folder)
    sync.probe("adapter")


def kill_the_engines_workers(sync) -> None:
    """Kill the engine's worker processes (`--tensor-parallel-size 2`) and wait until vLLM sees them gone."""
    executor = sync.engine.core.model_executor
    for worker in executor.workers:
        worker.proc.kill()
        worker.proc.join()
    deadline = time.monotonic() + 60
    while not executor.is_failed and time.monotonic() < deadline:
        time.sleep(0.2)
    assert executor.is_failed, "vLLM did not see its workers die within 60 s"


def adds_the_adapter_to_a_dead_engine(sync):
    kill_the_engines_workers(sync)
    sync.add_adapter()
    sync.probe("adapter")


def probes_a_dead_engine(sync):
    sync.reload_from_disk()
    kill_the_engines_workers(sync)
    sync.probe("base")  # asks the engine which adapters it holds first
