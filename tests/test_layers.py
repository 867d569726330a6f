"""Per-module weights read back from the real engine: a sync that breaks only some modules is
found, and only those modules are named."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from conftest import CHECKPOINT, FIXTURES, LLAMA_RSLORA, adapter_modules, layer_modules
from rich.console import Console

from lora_doctor.plans.builtin import Plan
from lora_doctor.report import render_terminal

# float32: the engine's weights matched W0 + ΔW to ~1e-7 relative; the bar is ±0.02.
SCALE_TOLERANCE = 0.02


def merged_layer0_then_adapter(sync) -> None:
    # A sync that merged only decoder layer 0 into the base, then added the adapter on top.
    sync.load_merged(decoder_layers={0})
    sync.add_adapter()
    sync.probe("layer0-merged+adapter")


@pytest.fixture(scope="module")
def partial_report(checker):
    return checker.run(Plan("test-layer0-merged", "layer 0 merged into the base, then the adapter", merged_layer0_then_adapter))


def test_only_the_broken_modules_are_off(partial_report):
    (phase,) = partial_report.phases
    assert len(phase.layers) == 14  # 2 layers × 7 target modules
    for layer in phase.layers:
        merged = ".layers.0." in layer.module
        assert layer.effective_scale == pytest.approx(2.0 if merged else 1.0, abs=SCALE_TOLERANCE), layer
        # Read apart: layer 0's base holds the merge and its slot the adapter; layer 1 only the slot.
        assert layer.base_part == pytest.approx(1.0 if merged else 0.0, abs=SCALE_TOLERANCE), layer
        assert layer.slot_part == pytest.approx(1.0, abs=SCALE_TOLERANCE), layer
    wrong = {layer.module for layer in phase.layers if layer.verdict != "ok"}
    assert wrong == {layer.module for layer in phase.layers if ".layers.0." in layer.module}
    assert {layer.verdict for layer in phase.layers if layer.module in wrong} == {"double_counted"}


def test_partial_phase_is_flagged_and_names_the_modules(partial_report):
    (phase,) = partial_report.phases
    assert phase.verdict == "partial"
    assert "double counted in 7/14 modules: layer 0 " in phase.explanation
    assert partial_report.exit_code == 1
    data = partial_report.to_dict()["phases"][0]["layers"]
    assert {layer["module"] for layer in data if layer["verdict"] == "double_counted"} == {
        f"model.layers.0.{kind}" for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }


def test_terminal_grid_shows_the_wrong_layer(partial_report):
    console = Console(record=True, width=160)
    render_terminal(partial_report, console)
    text = console.export_text()
    assert "7/14 wrong" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 7}
    assert rows["0"].count("2.000") == 7
    assert rows["1"].count("1.000") == 7


def test_adapter_synced_onto_the_disk_base_holds_exactly_w0_plus_delta(checker):
    def base_then_adapter(sync) -> None:
        sync.load_base()
        sync.add_adapter()
        sync.probe("base+adapter")

    (phase,) = checker.run(Plan("test-base-adapter", "disk base + adapter", base_then_adapter)).phases
    assert phase.verdict == "ok"
    assert layer_modules(phase.layers) == adapter_modules(CHECKPOINT)
    for layer in phase.layers:
        assert layer.effective_scale == pytest.approx(1.0, abs=SCALE_TOLERANCE)
        assert layer.divergence < 1e-3


def test_targeted_modules_without_figures_are_listed_with_the_reason(checker, tmp_path):
    from safetensors.torch import load_file, save_file

    from lora_doctor.measure.phase import NOT_READ_ABSENT, NOT_READ_ZERO
    from lora_doctor.report.format import modules_line
    from lora_doctor.result import PhaseResult

    tensors = load_file(str(CHECKPOINT / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp."
    tensors[prefix + "down_proj.lora_B.weight"].zero_()  # an untrained module: ΔW = 0
    # A module the engine has no LoRA layer for (a misnamed target, vLLM #34186).
    tensors[prefix + "extra_proj.lora_A.weight"] = tensors[prefix + "up_proj.lora_A.weight"].clone()
    tensors[prefix + "extra_proj.lora_B.weight"] = tensors[prefix + "up_proj.lora_B.weight"].clone()
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    shutil.copy(CHECKPOINT / "adapter_config.json", tmp_path / "adapter_config.json")

    layers, not_read = checker.measurer.layer_results(checker.engine, None, tmp_path)
    assert not_read == [
        {"module": "model.layers.1.mlp.down_proj", "reason": NOT_READ_ZERO},
        {"module": "model.layers.1.mlp.extra_proj", "reason": NOT_READ_ABSENT},
    ]
    assert len(layers) == 13
    # The renderers' one line counts the read modules against every targeted one.
    healthy = [replace(layer, verdict="ok") for layer in layers]
    phase = PhaseResult(0, "p", False, "ok", "", 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, layers=healthy, modules_not_read=not_read)
    assert modules_line(phase).startswith("13 of 15 targeted LoRA modules hold W0 + ΔW")


def test_a_module_vllm_serves_but_the_read_cannot_read_says_so(tmp_path):
    """An LM-head LoRA on a Llama base: vLLM wraps the head (LogitsProcessorWithLoRA) and serves it;
    the per-module read reads linear layers only. The reason must not say vLLM ignores it."""
    import torch
    from safetensors.torch import load_file, save_file

    from lora_doctor import Checker
    from lora_doctor.measure.phase import NOT_READ_ABSENT, NOT_READ_UNREADABLE

    tensors = load_file(str(LLAMA_RSLORA / "adapter_model.safetensors"))
    a = next(t for k, t in tensors.items() if k.endswith("lora_A.weight"))
    config = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
    torch.manual_seed(0)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(a.shape[0], config["hidden_size"]) * 0.01
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(config["vocab_size"], a.shape[0]) * 0.01
    # And a module no engine layer holds: vLLM does not apply it.
    prefix = "base_model.model.model.layers.0.mlp."
    tensors[prefix + "extra_proj.lora_A.weight"] = tensors[prefix + "up_proj.lora_A.weight"].clone()
    tensors[prefix + "extra_proj.lora_B.weight"] = tensors[prefix + "up_proj.lora_B.weight"].clone()
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    shutil.copy(LLAMA_RSLORA / "adapter_config.json", tmp_path / "adapter_config.json")

    with Checker(LLAMA_RSLORA, prompts=["The capital of France is"], max_new_tokens=1) as llama:
        assert llama.engine.rpc("lora_doctor_modules")[0]["modules"]["lm_head"] == "LogitsProcessorWithLoRA"
        layers, not_read = llama.measurer.layer_results(llama.engine, None, tmp_path)
    assert layer_modules(layers) == adapter_modules(LLAMA_RSLORA)
    assert not_read == [
        {"module": "lm_head", "reason": NOT_READ_UNREADABLE.format(layer="LogitsProcessorWithLoRA")},
        {"module": "model.layers.0.mlp.extra_proj", "reason": NOT_READ_ABSENT},
    ]
