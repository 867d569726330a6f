"""Verdict rules and thresholds (pure logic)."""

import pytest

from lora_doctor.verdict import Thresholds, overall_verdict, phase_verdict

LIMITS = Thresholds()


@pytest.mark.parametrize(
    ("kl_mean", "scale", "fitted_kl", "expected"),
    [
        (1e-7, 1.0, 1e-7, "ok"),
        (0.5, 2.0, 1e-7, "double_counted"),
        (0.5, 0.02, 1e-7, "missing"),
        (0.5, 1.41, 1e-7, "scaled"),
        (0.5, 1.0, 0.2, "diverged"),
        (0.5, 1.0, 1e-7, "diverged"),
    ],
)
def test_phase_verdict(kl_mean, scale, fitted_kl, expected):
    assert phase_verdict(kl_mean, scale, fitted_kl, LIMITS) == expected


def test_half_precision_thresholds_are_looser():
    assert Thresholds.for_dtype("bfloat16").kl_mean > Thresholds.for_dtype("float32").kl_mean


def test_override_replaces_known_and_rejects_unknown_thresholds():
    assert LIMITS.override({"kl_mean": 1e-3}).kl_mean == 1e-3
    with pytest.raises(ValueError, match="unknown threshold"):
        LIMITS.override({"kl_meen": 1.0})


def test_overall_verdict_fails_on_any_unhealthy_phase():
    assert overall_verdict(["ok", "ok"]) == "pass"
    assert overall_verdict(["ok", "double_counted"]) == "fail"


def test_some_modules_wrong_is_partial_even_when_logits_look_fine():
    from lora_doctor.verdict import refine_with_layers

    assert refine_with_layers("ok", ["ok", "double_counted"]) == "partial"
    assert refine_with_layers("double_counted", ["double_counted", "missing"]) == "partial"
    assert refine_with_layers("ok", ["missing", "missing"]) == "missing"
    assert refine_with_layers("double_counted", ["ok", "ok"]) == "double_counted"


def test_layer_verdict_names_the_multiple_of_delta_the_module_holds():
    from lora_doctor.verdict import layer_verdict

    assert layer_verdict(1.0, 1e-7, 1e-7, LIMITS) == "ok"
    assert layer_verdict(2.0, 1e-7, 1.0, LIMITS) == "double_counted"
    assert layer_verdict(0.0, 1e-7, 1.0, LIMITS) == "missing"
    assert layer_verdict(1.5, 1e-7, 0.5, LIMITS) == "scaled"
    assert layer_verdict(1.0, 0.05, 0.05, LIMITS) == "diverged"


def test_wrong_modules_are_named_by_layer_range_and_kind():
    from lora_doctor.verdict import describe_modules

    modules = [(f"model.layers.{i}.self_attn.{k}", "double_counted" if i < 3 else "ok") for i in range(6) for k in ("q_proj", "v_proj")]
    assert describe_modules(modules) == "double counted in 6/12 modules: layers 0–2 (q_proj, v_proj)"


@pytest.mark.parametrize(
    ("factor", "r", "alpha", "rslora", "needle"),
    [
        (0.25, 16, 16, True, "rsLoRA adapter scaled as plain"),
        (2.83, 8, 16, False, "plain LoRA adapter scaled as rsLoRA"),
        (0.5, 8, 16, False, "was dropped"),
        (1.3, 8, 16, False, None),
    ],
)
def test_scale_hint_names_scaling_confusions(factor, r, alpha, rslora, needle):
    from lora_doctor.verdict import scale_hint

    hint = scale_hint(factor, r, alpha, rslora)
    assert (hint is None) if needle is None else (needle in hint)
