"""A check opens its checkpoint once: adapter_config.json, the adapter's safetensors header and the base's
config and weight headers are each read once by lora-doctor, and once per engine by its worker."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

from conftest import BASE, CHECKPOINT, assert_one_line_error, run_cli
from safetensors import safe_open

BASE_TENSORS = len(safe_open(str(BASE / "model.safetensors"), "pt").keys())
WATCHED = {
    (CHECKPOINT / "adapter_config.json").resolve(): "adapter config",
    (CHECKPOINT / "adapter_model.safetensors").resolve(): "adapter header",
    (BASE / "config.json").resolve(): "base config",
    (BASE / "model.safetensors").resolve(): "base header",  # the fixture's one weight file (no index)
}


def reader() -> str:
    """Who is reading: the engine's worker (its own process on a real deployment), a tensor's value
    read when its turn comes in a streamed push (`weight_files.read_tensor`: one tensor's bytes, not the
    header), the engine driver's rank check of each folder a plan adds (engine/driver.py `_check_rank`,
    on the folder the sync publishes, a link to the checkpoint's files), which still takes a folder,
    or lora-doctor's own opening of the checkpoint."""
    frames = traceback.extract_stack()
    if any(f.filename.endswith("lora_doctor/engine/worker.py") for f in frames):
        return "engine"
    if any(f.filename.endswith("lora_doctor/adapter/weight_files.py") and f.name == "read_tensor" for f in frames):
        return "tensor value"
    if any(f.filename.endswith("lora_doctor/engine/driver.py") and f.name == "_check_rank" for f in frames):
        return "adapter added"
    return "lora-doctor"


def test_one_default_check_reads_each_checkpoint_file_once(tmp_path, monkeypatch):
    reads: Counter = Counter()
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        # Path.read_text (the JSON reads) and the header reads both go through Path.open.
        what = WATCHED.get(self.resolve())
        if what is not None:
            reads[reader(), what] += 1
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    report = tmp_path / "report.json"
    run = run_cli("check", CHECKPOINT, "--json", report)
    monkeypatch.undo()
    assert run.exit_code == 1, run.stderr  # the default plan's double count, measured
    assert report.is_file()
    for what in WATCHED.values():
        assert reads["lora-doctor", what] == 1, (what, reads)
        # Once per engine, not once per phase: the default plan measures two phases.
        assert reads["engine", what] == 1, (what, reads)
    # The default plan pushes the merged weights as the base: each base tensor's value is read once, when
    # its turn comes (the engine's copy is the push's only whole-model copy); the driver reads the config
    # of the one adapter the default plan adds.
    assert 0 < reads["tensor value", "base header"] <= BASE_TENSORS, reads
    assert reads["adapter added", "adapter config"] <= 1 and reads["adapter added", "adapter header"] == 0, reads
    assert not {what for who, what in reads if who in ("sync merge", "adapter added") and what.startswith("base")}, reads


def test_the_position_limit_is_the_base_configs_as_the_checkpoint_read_it(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("word " * 300 + "\n")
    report = tmp_path / "report.json"
    run = run_cli("check", CHECKPOINT, "--prompts", prompts, "--json", report)
    assert_one_line_error(run, 2, "more than the model's 256", unwritten=report)
