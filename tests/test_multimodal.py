"""A multimodal base (tiny Qwen2.5-VL) with a LoRA on its language model: names, pre-flight,
reference and the real vLLM engine.

The adapter names its modules `model.language_model.layers.*` (PEFT on transformers >= 4.52), the
base checkpoint stores `model.layers.*` (transformers 5 saves the original layout), and vLLM calls
them `language_model.model.layers.*`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, run_cli
from processes import run_process

from lora_doctor.adapter.checkpoint import load_checkpoint
from lora_doctor.adapter.lora_delta import load_lora_factors
from lora_doctor.adapter.names import LANGUAGE_MODEL, TOWER, NameMap, engine_naming, name_map
from lora_doctor.preflight import inspect_checkpoint

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)

VL_BASE = FIXTURES / "tiny-qwen2.5-vl"
VL_CHECKPOINT = FIXTURES / "checkpoint-vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
# The LoRA's modules in the adapter's names (r=8 on q_proj/v_proj of both decoder layers).
ADAPTER_MODULES = [f"model.language_model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in ("q", "v")]
# The Qwen2.5-Omni thinker's prefix: what an adapter trained on the thinker says, and a prefix
# Qwen2.5-VL's hf_to_vllm_mapper does not rename.
THINKER = ("base_model.model.model.language_model.", "base_model.model.thinker.model.")
# float32 on CPU: engine vs HF+PEFT measured |KL| ≈ 2e-8 per token (rounding), while leaving out this
# LoRA costs KL ≈ 0.67; 1e-5 sits far from both.
KL_FLOAT32 = 1e-5
LORA_EFFECT = 0.1


def rename_adapter(source: Path, target: Path, old: str, new: str) -> Path:
    """A copy of an adapter folder whose tensor keys have `old` replaced by `new`."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file({key.replace(old, new): value for key, value in tensors.items()}, str(target / "adapter_model.safetensors"))
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(VL_BASE.resolve())
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


# --------------------------------------------------------------------------- names, no engine


def test_three_names_join_on_the_engine_name():
    names = name_map(VL_BASE)
    assert names.naming.architecture == ARCHITECTURE
    resolved = names.resolve("base_model.model.model.language_model.layers.1.self_attn.v_proj")
    assert resolved.adapter == "model.language_model.layers.1.self_attn.v_proj"
    assert resolved.base == "model.layers.1.self_attn.v_proj.weight"
    assert resolved.engine == "language_model.model.layers.1.self_attn.v_proj"
    assert resolved.role == LANGUAGE_MODEL
    # A base saved by transformers 4.52-4.57 (`model.language_model.*`) meets the same engine name.
    newer = NameMap(["model.language_model.layers.1.self_attn.v_proj.weight"], engine_naming(ARCHITECTURE))
    assert newer.base_key("model.language_model.layers.1.self_attn.v_proj.weight") == "model.language_model.layers.1.self_attn.v_proj.weight"
    assert names.base_key("model.language_model.layers.1.self_attn.v_proj.weight") == "model.layers.1.self_attn.v_proj.weight"
    assert names.base_key_for_engine("language_model.model.layers.1.self_attn.v_proj") == "model.layers.1.self_attn.v_proj.weight"
    assert names.by_engine_name(ADAPTER_MODULES)["language_model.model.layers.0.self_attn.q_proj"] == ADAPTER_MODULES[0]
    tower = names.resolve("model.visual.blocks.0.attn.qkv")
    assert (tower.base, tower.engine, tower.role) == ("visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv", TOWER)


def test_text_only_names_are_unchanged():
    names = name_map(FIXTURES / "tiny-qwen2")
    resolved = names.resolve("model.layers.0.self_attn.q_proj")
    assert (resolved.base, resolved.engine, resolved.role) == ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj", LANGUAGE_MODEL)


def test_renames_read_from_source_equal_vllms_own_mapper():
    """The mapper read with `ast` renames every base and adapter name exactly as vLLM's class does."""
    from safetensors import safe_open
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    vllm_mapper = Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper.get_rename_mapper()
    with safe_open(str(VL_BASE / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    names += ADAPTER_MODULES + ["model.visual.blocks.0.attn.qkv", "lm_head", "thinker.model.layers.0.self_attn.q_proj"]
    ours = engine_naming(ARCHITECTURE).renamer
    assert [ours(n) for n in names] == [vllm_mapper.map_name(n) for n in names]


# --------------------------------------------------------------------------- pre-flight


def test_checkpoint_loads_on_its_multimodal_base():
    ckpt = load_checkpoint(VL_CHECKPOINT)
    assert ckpt.module_names == sorted(ADAPTER_MODULES)


def test_inspect_has_no_false_missing_target(tmp_path):
    out = tmp_path / "inspect.json"
    run = run_cli("inspect", VL_CHECKPOINT, "--json", out)
    assert run.exit_code == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["checkpoint"]["architectures"] == [ARCHITECTURE]
    assert report["findings"] == []


def test_preflight_names_a_prefix_the_engine_does_not_map(tmp_path):
    adapter = rename_adapter(VL_CHECKPOINT, tmp_path / "thinker-adapter", *THINKER)
    report = inspect_checkpoint(adapter)
    assert "missing_target" not in report.codes
    (finding,) = report.by_code("engine_name_mismatch")
    assert finding.severity == "problem"
    assert sorted(finding.subjects) == sorted(m.replace("model.language_model.", "thinker.model.") for m in ADAPTER_MODULES)
    # The three names side by side: the adapter's, what the engine makes of it, and the base's.
    for name in (
        "adapter thinker.model.layers.0.self_attn.q_proj",
        "engine thinker.model.layers.0.self_attn.q_proj (no such module)",
        "base model.layers.0.self_attn.q_proj.weight → engine language_model.model.layers.0.self_attn.q_proj",
    ):
        assert name in finding.message
    assert "'base_model.model.thinker.' → 'base_model.model.'" in finding.fix
    run = run_cli("inspect", adapter)
    assert run.exit_code == 1, run.stdout + run.stderr


def test_preflight_reports_vision_tower_lora_as_not_served(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(VL_BASE), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "q_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(tmp_path / "tower"))
    report = inspect_checkpoint(tmp_path / "tower", base=VL_BASE)
    assert "missing_target" not in report.codes and "engine_name_mismatch" not in report.codes
    (finding,) = report.by_code("tower_lora_not_served")
    # Qwen2.5-VL supports tower LoRA behind enable_tower_connector_lora: a warning with that fix.
    assert finding.severity == "warning"
    assert finding.subjects == ("model.visual.blocks.0.attn.qkv",)
    assert "enable_tower_connector_lora=True" in finding.fix


# --------------------------------------------------------------------------- reference and engine


@pytest.fixture(scope="module")
def reference():
    from lora_doctor.measure.reference import Reference

    return Reference(load_checkpoint(VL_CHECKPOINT))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """KL figures of the real engine on the fixture (tests/multimodal_engine.py)."""
    import multimodal_engine

    if importlib.util.find_spec("torchvision") is None:
        pytest.fail("vLLM's Qwen2.5-VL needs torchvision: install the environment with `make install`")
    renamed = rename_adapter(VL_CHECKPOINT, tmp_path_factory.mktemp("vl") / "thinker-adapter", *THINKER)
    return multimodal_engine.main(VL_CHECKPOINT, renamed)


def test_reference_loads_the_multimodal_base(reference):
    assert type(reference.model.base_model.model).__name__ == ARCHITECTURE
    assert reference.vocab_size == json.loads((VL_BASE / "config.json").read_text())["text_config"]["vocab_size"]
    assert sorted(reference.module_order) == sorted(ADAPTER_MODULES)
    names = name_map(VL_BASE)
    # ΔW read from the adapter (in its names) lands on the base's own weight keys.
    assert sorted(names.base_key(module) for module in load_lora_factors(VL_CHECKPOINT)) == sorted(
        f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in ("q", "v")
    )


def test_engine_applies_the_lora_as_peft_does(measured):
    assert abs(measured["reference_vs_engine_with_lora"]) < KL_FLOAT32
    assert abs(measured["reference_vs_engine_without_lora"]) < KL_FLOAT32
    assert measured["lora_effect"] > LORA_EFFECT
    # LoRA wraps the language model only (no enable_tower_connector_lora): the names the pre-flight uses.
    assert "language_model.model.layers.0.self_attn.qkv_proj" in measured["engine_lora_modules"]
    assert not [m for m in measured["engine_lora_modules"] if m.startswith("visual.")]


def test_engine_silently_ignores_a_prefix_it_does_not_map(measured):
    """What the pre-flight's engine_name_mismatch says, seen in the engine: the renamed adapter
    loads without an error and changes nothing."""
    assert abs(measured["renamed_vs_without"]) < KL_FLOAT32


def test_transformers_and_torchvision_import_in_a_fresh_process():
    """The install keeps PyPI's torchvision (vLLM's Qwen-VL files need it): a new interpreter imports it,
    transformers' image utilities and vLLM's Qwen2.5-VL model file."""
    code = "import torchvision, transformers.image_utils, vllm.model_executor.models.qwen2_5_vl; print(torchvision.__version__)"
    done = run_process([sys.executable, "-c", code], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------- built-in plans, CLI


@pytest.fixture(scope="module")
def plan_reports(tmp_path_factory):
    """`lora-doctor check` on the VL fixture, as a user runs it, for two plans with a known truth."""
    out = tmp_path_factory.mktemp("vl-reports")
    reports = {}
    for plan in ("swift-fixed", "swift-colocate-lora"):
        run = run_cli("check", VL_CHECKPOINT, "--plan", plan, "--json", out / f"{plan}.json")
        reports[plan] = (run, json.loads((out / f"{plan}.json").read_text()) if (out / f"{plan}.json").exists() else None)
    return reports


def phase_figures(report: dict) -> list[tuple[str, str, float, list[float]]]:
    return [(p["name"], p["verdict"], p["effective_scale"], [layer["effective_scale"] for layer in p["layers"]]) for p in report["phases"]]


def test_the_fixed_sync_path_is_healthy_on_a_multimodal_base(plan_reports):
    run, report = plan_reports["swift-fixed"]
    assert run.exit_code == 0, run.stderr
    for name, verdict, alpha, layers in phase_figures(report):
        assert verdict == "ok", name
        assert alpha == pytest.approx(1.0, abs=0.02)
        # Every module of the adapter is read, in the adapter's own names.
        assert len(layers) == len(ADAPTER_MODULES) and all(a == pytest.approx(1.0, abs=0.02) for a in layers)
    assert sorted(layer["module"] for layer in report["phases"][0]["layers"]) == sorted(ADAPTER_MODULES)


def test_the_double_count_after_resume_is_caught_on_a_multimodal_base(plan_reports):
    run, report = plan_reports["swift-colocate-lora"]
    assert run.exit_code == 1, run.stderr
    (merged, merged_verdict, merged_alpha, merged_layers), (adapter, verdict, alpha, layers) = phase_figures(report)
    assert (merged, merged_verdict) == ("full-merged", "ok")
    assert merged_alpha == pytest.approx(1.0, abs=0.02) and all(a == pytest.approx(1.0, abs=0.02) for a in merged_layers)
    assert (adapter, verdict) == ("adapter", "double_counted")
    assert alpha == pytest.approx(2.0, abs=0.02)
    assert len(layers) == len(ADAPTER_MODULES) and all(a == pytest.approx(2.0, abs=0.02) for a in layers)
    # Named by its structure: ΔW merged into the engine's base and loaded in its slot, in every module.
    for layer in report["phases"][1]["layers"]:
        assert layer["base_part"] == pytest.approx(1.0, abs=0.02) and layer["slot_part"] == pytest.approx(1.0, abs=0.02), layer


def test_a_prefix_the_engine_does_not_map_stops_the_check_with_the_names(tmp_path):
    renamed = rename_adapter(VL_CHECKPOINT, tmp_path / "thinker", *THINKER)
    run = run_cli("check", renamed, "--json", tmp_path / "r.json")
    assert run.exit_code == 1, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["phases"] == [] and "engine_name_mismatch" in report["stopped"]
    finding = next(f for f in report["preflight"] if f["code"] == "engine_name_mismatch")
    assert "thinker.model.layers.0.self_attn.q_proj" in finding["message"]
