"""Every adapter_config.json field a trainer writes is validated once, where the config is parsed: a bad
field is one line naming the file and the field, exit 2, before the reference or the engine loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import BASE, CHECKPOINT, LLAMA_RSLORA, PREVIOUS, assert_one_line_error, run_cli

from lora_doctor.adapter.spec import spec_from_config
from lora_doctor.errors import BadInput

GOOD = json.loads((CHECKPOINT / "adapter_config.json").read_text())


def edited_checkpoint(tmp_path: Path, **fields) -> Path:
    """A copy of the fixture checkpoint whose adapter_config.json has `fields` set (its base named by
    absolute path, so that the copy resolves it as the original does)."""
    folder = tmp_path / "checkpoint-500"
    shutil.copytree(CHECKPOINT, folder)
    config = dict(GOOD, base_model_name_or_path=str(BASE.resolve()), **fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """What the run loaded: the reference and the engine record themselves here as they start (their
    real constructors run after)."""
    from lora_doctor.engine.driver import Engine
    from lora_doctor.measure.reference import Reference

    started: list[str] = []
    for name, cls in (("engine", Engine), ("reference", Reference)):
        real = cls.__init__

        def spy(self, *args, _real=real, _name=name, **kwargs):
            started.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", spy)
    return started


# The table: each row's edit, and the field the one line must name.
ROWS = {
    "lora_alpha_zero": ({"lora_alpha": 0}, "lora_alpha is 0: the LoRA can change nothing"),
    "rank_pattern_zero": ({"rank_pattern": {"q_proj": 0}}, 'rank_pattern["q_proj"] is 0'),
    "target_modules_int": ({"target_modules": 5}, "target_modules is 5"),
    "peft_type_null": ({"peft_type": None}, "peft_type is null"),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_a_bad_field_is_one_line_naming_it_before_anything_loads(row, tmp_path, loads):
    edit, needle = ROWS[row]
    folder = edited_checkpoint(tmp_path, **edit)
    report = tmp_path / "report.json"
    run = run_cli("check", folder, "--plan", "swift-colocate-lora", "--json", report)
    line = assert_one_line_error(run, 2, needle, unwritten=report)
    assert str(folder / "adapter_config.json") in line
    assert loads == []


@pytest.mark.parametrize("command", ["inspect", "audit"])
@pytest.mark.parametrize("row", sorted(ROWS))
def test_inspect_and_audit_refuse_a_bad_field_the_same_way(row, command, tmp_path):
    edit, needle = ROWS[row]
    folder = edited_checkpoint(tmp_path, **edit)
    report = tmp_path / "report.json"
    # The audit's export is the base itself: the adapter's config is refused before the export is read.
    args = ("inspect", folder) if command == "inspect" else ("audit", BASE, "--adapter", folder)
    run = run_cli(*args, "--json", report)
    assert_one_line_error(run, 2, needle, unwritten=report)


def test_a_previous_adapter_of_another_base_is_refused_naming_both(tmp_path, loads):
    report = tmp_path / "report.json"
    run = run_cli("check", CHECKPOINT, "--previous", LLAMA_RSLORA, "--plan", "adapter-reused-id", "--json", report)
    line = assert_one_line_error(run, 2, "--previous", unwritten=report)
    assert str((CHECKPOINT.parent / "tiny-llama").resolve()) in line and str(BASE.resolve()) in line
    assert "model_type 'llama'" in line and "model_type 'qwen2'" in line
    assert loads == []


# Unit tests of the validator: each field's bad forms, and the forms PEFT writes that must pass.
BAD = [
    ("r", 0), ("r", -1), ("r", 8.5), ("r", "8"), ("r", True), ("r", None),
    ("lora_alpha", 0), ("lora_alpha", 0.0), ("lora_alpha", "16"), ("lora_alpha", None), ("lora_alpha", float("nan")), ("lora_alpha", False),
    ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": 4.5}), ("rank_pattern", {"q_proj": "4"}), ("rank_pattern", ["q_proj"]), ("rank_pattern", {"(q_proj": 4}),
    ("alpha_pattern", {"q_proj": 0}), ("alpha_pattern", {"q_proj": "8"}), ("alpha_pattern", 8), ("alpha_pattern", {"[": 8}),
    ("target_modules", 5), ("target_modules", ["q_proj", 5]), ("target_modules", {"q_proj": 1}), ("target_modules", "(q_proj"),
    ("use_rslora", "yes"), ("use_rslora", 1), ("use_dora", "false"), ("fan_in_fan_out", 0),
    ("modules_to_save", "lm_head"), ("modules_to_save", [1]),
    ("trainable_token_indices", [1, -2]), ("trainable_token_indices", "1,2"), ("trainable_token_indices", {"embed_tokens": 3}),
    ("peft_type", None), ("peft_type", 1), ("peft_type", "IA3"),
    ("base_model_name_or_path", 5), ("base_model_name_or_path", ["../tiny-qwen2"]),
    ("bias", "some"), ("bias", True),
    ("layers_to_transform", "0"), ("layers_to_transform", [0, -1]), ("layers_to_transform", 1.5),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_each_bad_form_of_a_field_is_refused_naming_the_field(field, value):
    config = dict(GOOD, **{field: value})
    with pytest.raises(BadInput) as raised:
        spec_from_config(config, Path("/ckpt"))
    line = str(raised.value)
    assert "\n" not in line and line.startswith("/ckpt")
    assert field in line, line


def test_a_missing_rank_is_refused():
    config = {k: v for k, v in GOOD.items() if k != "r"}
    with pytest.raises(BadInput, match="r is missing"):
        spec_from_config(config, Path("/ckpt"))


GOOD_FORMS = [
    ("target_modules", "all-linear", ["all-linear"]),
    ("target_modules", r".*\.(q_proj|v_proj)", [r".*\.(q_proj|v_proj)"]),
    ("target_modules", None, []),
    ("target_modules", ["v_proj", "q_proj"], ["q_proj", "v_proj"]),
    ("lora_alpha", -16, -16.0),
    ("lora_alpha", 0.5, 0.5),
    ("rank_pattern", {"q_proj": 4}, {"q_proj": 4}),
    ("rank_pattern", None, {}),
    ("alpha_pattern", {"down_proj": 32}, {"down_proj": 32.0}),
    ("modules_to_save", ["lm_head"], ["lm_head"]),
    ("modules_to_save", None, []),
    ("trainable_token_indices", [1, 2], [1, 2]),
    ("trainable_token_indices", {"embed_tokens": [3]}, {"embed_tokens": [3]}),
    ("layers_to_transform", 0, [0]),
    ("layers_to_transform", [0, 1], [0, 1]),
    ("bias", "lora_only", "lora_only"),
    ("use_rslora", None, False),
    ("use_dora", True, True),
    ("base_model_name_or_path", None, None),
]


@pytest.mark.parametrize(("field", "value", "read"), GOOD_FORMS, ids=[f"{f}={v!r}" for f, v, _ in GOOD_FORMS])
def test_each_form_peft_writes_is_read(field, value, read):
    spec = spec_from_config(dict(GOOD, **{field: value}), Path("/ckpt"))
    assert getattr(spec, field) == read


def test_a_config_without_peft_type_or_alpha_reads_as_peft_does():
    config = {k: v for k, v in GOOD.items() if k not in ("peft_type", "lora_alpha")}
    spec = spec_from_config(config, Path("/ckpt"))
    assert spec.lora_alpha == 8 and spec.scaling == 1.0


def test_a_previous_adapter_whose_own_base_is_a_copy_of_the_same_model_is_taken(tmp_path):
    from lora_doctor.adapter.checkpoint import load_checkpoint, load_previous

    previous = tmp_path / "checkpoint-250"
    shutil.copytree(PREVIOUS, previous)
    config = json.loads((previous / "adapter_config.json").read_text())
    # The same model stored in bfloat16, in another folder: the same architecture and shapes.
    config["base_model_name_or_path"] = str((BASE.parent / "tiny-qwen2-bf16").resolve())
    (previous / "adapter_config.json").write_text(json.dumps(config))
    checkpoint = load_checkpoint(CHECKPOINT)
    opened = load_previous(previous, checkpoint)
    assert opened.base_dir == checkpoint.base_dir == BASE.resolve()
    with pytest.raises(BadInput, match="was trained on base"):
        load_previous(LLAMA_RSLORA, checkpoint)
