"""ΔW read from the adapter file follows PEFT's own `get_delta_weight`, rsLoRA and patterns included."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE, CHECKPOINT

from lora_doctor.lora_delta import load_lora_factors, merge_in_dtype


def peft_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(adapter_dir))
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {})
    }


def save_adapter(path, **config) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(path)


def assert_same_deltas(adapter_dir) -> None:
    expected = peft_deltas(adapter_dir)
    factors = load_lora_factors(adapter_dir)
    assert set(factors) == set(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(factors[name].delta(), delta, rtol=0, atol=1e-7)


def test_fixture_adapter_matches_peft():
    assert_same_deltas(CHECKPOINT)


@pytest.mark.parametrize(
    "config",
    [
        {"r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"down_proj": 4},
            "alpha_pattern": {"layers.1.self_attn.q_proj": 32},
        },
    ],
    ids=["rslora", "rank-alpha-patterns"],
)
def test_scaling_rules_match_peft(tmp_path, config):
    save_adapter(tmp_path / "adapter", **config)
    assert_same_deltas(tmp_path / "adapter")


def test_merge_in_dtype_rounds_like_a_half_precision_trainer():
    # A ΔW far below half an ulp of W0 vanishes in a bf16 merge and survives in float32.
    w0 = torch.full((4, 4), 1.0)
    delta = torch.full((4, 4), 1e-4)
    assert torch.equal(merge_in_dtype(w0, delta, torch.bfloat16).float(), w0)
    assert torch.allclose(merge_in_dtype(w0, delta, torch.float32), w0 + delta)
    # What PEFT's in-place merge on a bf16 weight holds.
    w0 = torch.randn(64, 64)
    delta = 0.01 * torch.randn(64, 64)
    peft_style = w0.to(torch.bfloat16)
    peft_style += delta.to(torch.bfloat16)
    assert torch.equal(merge_in_dtype(w0, delta, torch.bfloat16), peft_style)
