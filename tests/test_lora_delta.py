"""ΔW read from the adapter file follows PEFT's own `get_delta_weight`, rsLoRA and patterns included."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE, CHECKPOINT

from lora_doctor.adapter.lora_delta import LoraFactors, load_lora_factors, merge_in_dtype


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


def test_fan_in_fan_out_and_blocks_match_peft_on_conv1d_weights():
    # GPT-2 stores its projections as Conv1D (in × out): PEFT sets fan_in_fan_out and returns ΔWᵀ.
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    checked = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            factors = LoraFactors(
                A=module.lora_A["default"].weight.detach(),
                B=module.lora_B["default"].weight.detach(),
                scaling=module.scaling["default"],
                fan_in_fan_out=True,
            )
            expected = module.get_delta_weight("default").detach()
            assert expected.shape == module.base_layer.weight.shape  # in × out
            torch.testing.assert_close(factors.delta(), expected, rtol=0, atol=1e-7)
            rows, cols = slice(3, 17), slice(5, 29)
            torch.testing.assert_close(factors.delta(rows, cols, torch.float64), expected[rows, cols].double(), rtol=0, atol=1e-7)
            checked += 1
    assert checked == 3  # attn.c_attn, attn.c_proj, mlp.c_proj


def test_module_figures_split_base_and_slot():
    from lora_doctor.measure.layer_figures import STAT_KEYS, module_figures

    torch.manual_seed(0)
    w0, delta = torch.randn(32, 32, dtype=torch.float64), 0.01 * torch.randn(32, 32, dtype=torch.float64)
    e = merge_in_dtype(w0, delta, torch.bfloat16).double() - w0.to(torch.bfloat16).double()

    def figures(base_holds, slot_holds):
        vectors = {"b": base_holds, "s": slot_holds, "D": delta, "e": e, "w": w0}
        return module_figures({key: float((vectors[key[0]] * vectors[key[1]]).sum()) for key in STAT_KEYS}, eps=2**-7)

    double = figures(e, delta)  # a bf16 merge as the base, the adapter in the slot
    assert double["base_part"] == pytest.approx(1.0) and double["slot_part"] == pytest.approx(1.0)
    assert double["base_residual"] == pytest.approx(0.0, abs=1e-6) and double["slot_residual"] == pytest.approx(0.0, abs=1e-6)
    assert double["merge_kept"] == pytest.approx(float((e * delta).sum() / (delta * delta).sum()))
    assert double["effective_scale"] == pytest.approx(1.0 + double["merge_kept"])
    assert double["rounding"] == pytest.approx(2**-7 * float(w0.norm() / delta.norm()))
    missing = figures(torch.zeros_like(w0), torch.zeros_like(w0))
    assert missing["base_part"] == 0.0 and missing["slot_part"] == 0.0 and missing["divergence"] == pytest.approx(1.0)
