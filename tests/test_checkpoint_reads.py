"""A check opens its checkpoint once, in the adapter wing: in one default check, adapter_config.json, the
adapter's safetensors header, the base's config.json, its index and each shard's header are read once
each, all by lora_doctor/adapter/; the engine's worker reads no config and no header (it is handed where
the tensors are), and no module outside lora_doctor/adapter/ opens a file of the checkpoint or the base.

The libraries lora-doctor drives read the same folders themselves, for what they build: transformers and
PEFT load the reference from them, vLLM its engine, the tokenizer its files. Those reads are theirs (a
frame of theirs between lora-doctor's call and the open), recorded and not counted here.

The checkpoint's path through `check()`, wing by wing, is written down in docs/checkpoint-path.md.
"""

from __future__ import annotations

import builtins
import io
import json
import shutil
import sys
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import BASE, CHECKPOINT, ROOT, assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
# Packages whose own reads of the folders are not lora-doctor's (see the module's docstring).
LIBRARIES = ("transformers", "peft", "vllm", "tokenizers", "huggingface_hub")


def sharded_copy(folder: Path) -> Path:
    """The fixture's base saved in two shards with an index, as large models are."""
    folder.mkdir()
    tensors = load_file(str(BASE / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, str(folder / file), metadata={"format": "pt"})
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for file in BASE.iterdir():
        if file.suffix == ".json":
            shutil.copy(file, folder / file.name)
    return folder


class Reads:
    """Every open of a file in the watched folders: who opened it and what it read."""

    def __init__(self, folders: list[Path]):
        self.folders = [folder.resolve() for folder in folders]
        self.own: Counter = Counter()  # (opening module, what, file) → opens, lora-doctor's own
        self.libraries: Counter = Counter()  # (library, lora-doctor module that called it, file) → opens

    def record(self, path) -> None:
        try:
            resolved = Path(path).resolve()
        except (TypeError, ValueError, OSError):
            return
        if resolved.parent not in self.folders:
            return
        frames = traceback.extract_stack()[:-2]
        library = None
        for frame in reversed(frames):
            if "/lora_doctor/" in frame.filename:
                module = "lora_doctor/" + frame.filename.split("/lora_doctor/")[-1]
                if library is not None:
                    self.libraries[library, module, resolved.name] += 1
                else:
                    self.own[module, self.what(frames), resolved.name] += 1
                return
            package = frame.filename.split("site-packages/")[-1].split("/")[0] if "site-packages/" in frame.filename else None
            if library is None and package in LIBRARIES:
                library = package

    @staticmethod
    def what(frames) -> str:
        """A header or a JSON file read whole, by the engine's worker or by lora-doctor; else a tensor's bytes."""
        names = {frame.name for frame in frames}
        side = "worker" if any(frame.filename.endswith("lora_doctor/engine/worker.py") for frame in frames) else "lora-doctor"
        if "read_header" in names:
            return f"{side}: header"
        if names & {"read_json", "_weight_map"}:
            return f"{side}: json"
        return f"{side}: tensor bytes"

    def count(self, what: str, file: str) -> int:
        return sum(n for (_module, kind, name), n in self.own.items() if kind == what and name == file)


@contextmanager
def recording(folders: list[Path]):
    """Every open of a file in `folders` (Python's `open` and safetensors' `safe_open`) while the block runs."""
    reads = Reads(folders)
    real_open = builtins.open  # io.open: Path.open and read_text call it

    def any_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            reads.record(file)
        return real_open(file, *args, **kwargs)

    import safetensors

    real_safe_open = safetensors.safe_open

    def safe_open(filename, *args, **kwargs):
        reads.record(filename)
        return real_safe_open(filename, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", any_open)
        patch.setattr(io, "open", any_open)
        patch.setattr(safetensors, "safe_open", safe_open)  # modules that import it when they read
        yield reads


@pytest.fixture(scope="module")
def one_check(tmp_path_factory):
    """One default check of the fixture's adapter on its base in two shards, every open recorded."""
    base = sharded_copy(tmp_path_factory.mktemp("base") / "tiny-qwen2-sharded")
    report = tmp_path_factory.mktemp("report") / "report.json"
    with recording([CHECKPOINT, base]) as reads:
        run = run_cli("check", CHECKPOINT, "--base", base, "--json", report)
    assert run.exit_code == 1, run.stderr  # the default plan's double count, measured
    assert report.is_file()
    return reads


def test_one_default_check_reads_each_checkpoint_file_once(one_check):
    reads = one_check
    once = {
        "json": ["adapter_config.json", "config.json", INDEX],
        "header": ["adapter_model.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
    }
    for kind, files in once.items():
        for file in files:
            assert reads.count(f"lora-doctor: {kind}", file) == 1, (kind, file, reads.own)
    # The worker is handed where the tensors are (engine/worker_contract.py): it reads their bytes, once
    # per phase, and no config, index or header.
    assert not [key for key in reads.own if key[1] in ("worker: json", "worker: header")], reads.own
    assert reads.count("worker: tensor bytes", "adapter_model.safetensors") > 0, reads.own
    # The adapter's values, in lora-doctor: once for the pre-flight's checks of them (NaN/Inf, an untrained
    # B), once for the default plan's merge (its factors).
    assert reads.count("lora-doctor: tensor bytes", "adapter_model.safetensors") == 2, reads.own
    # Nothing else of either folder is read by lora-doctor whole: the rest are tensors' bytes.
    kinds = {kind for _module, kind, _file in reads.own}
    assert kinds <= {"lora-doctor: json", "lora-doctor: header", "lora-doctor: tensor bytes", "worker: tensor bytes"}, kinds


def test_nothing_outside_the_adapter_wing_opens_a_file_of_the_checkpoint_or_the_base(one_check):
    openers = {module for module, _kind, _file in one_check.own}
    assert openers, "no read recorded: the recorder saw nothing"
    outside = {key: n for key, n in one_check.own.items() if not key[0].startswith("lora_doctor/adapter/")}
    assert not outside, f"opened outside lora_doctor/adapter/: {outside}"
    # The libraries' own reads are there too (the reference, the engine, the tokenizer), and not lora-doctor's.
    assert {library for library, _module, _file in one_check.libraries} >= {"transformers", "vllm"}, one_check.libraries


def test_an_audit_opens_the_checkpoint_and_the_base_through_the_adapter_wing_only(tmp_path):
    # The audit reads both folders whole (every base tensor against the export's): through the
    # adapter wing's inventories and readers, as the check does, the base's config.json included.
    sys.path.insert(0, str(ROOT / "fixtures"))
    import build_fixtures

    export = build_fixtures.export_merged(tmp_path / "export")
    # The export writes the tied head out (the base leaves it to the embedding): pairing it asks
    # whether the base ties them, which its config.json says.
    weights = load_file(str(export / "model.safetensors"))
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    with recording([CHECKPOINT, BASE]) as reads:
        run = run_cli("audit", export, "--adapter", CHECKPOINT, "--json", tmp_path / "audit.json")
    assert run.exit_code == 0, run.stderr
    assert {file for _module, _kind, file in reads.own} >= {"adapter_config.json", "config.json", "model.safetensors"}, reads.own
    outside = {key: n for key, n in reads.own.items() if not key[0].startswith("lora_doctor/adapter/")}
    assert not outside, f"opened outside lora_doctor/adapter/: {outside}"


def test_the_position_limit_is_the_base_configs_as_the_checkpoint_read_it(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("word " * 300 + "\n")
    report = tmp_path / "report.json"
    run = run_cli("check", CHECKPOINT, "--prompts", prompts, "--json", report)
    assert_one_line_error(run, 2, "more than the model's 256", unwritten=report)


def test_the_workers_request_crosses_every_transport_of_collective_rpc_unchanged():
    """The request goes by pickle to tensor-parallel workers and by vLLM's msgpack encoder to an engine
    core in a process of its own, which refuses any object it does not know (a Path, a torch dtype)
    unless VLLM_ALLOW_INSECURE_SERIALIZATION is set: its wire form must pass both and come back whole."""
    import pickle

    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from lora_doctor.adapter.checkpoint import load_checkpoint
    from lora_doctor.engine.worker_contract import from_wire, layer_read, to_wire

    request = layer_read(load_checkpoint(CHECKPOINT))
    assert len(request.factors) == 14 and request.base_tensors
    wire = to_wire(request)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
        with pytest.raises(TypeError, match="not serializable"):
            MsgpackEncoder().encode(request)  # the object itself does not cross
        crossed = MsgpackDecoder().decode(MsgpackEncoder().encode(wire))
    assert from_wire(crossed) == request
    assert from_wire(pickle.loads(pickle.dumps(wire))) == request
