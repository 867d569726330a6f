"""Verdict rules and thresholds (pure logic)."""

from types import SimpleNamespace

import pytest

from lora_doctor.measure.metrics import ScaleFit
from lora_doctor.measure.noise import MEASURED, PRIOR, Resolution, measure_resolution
from lora_doctor.measure.verdict import (
    Thresholds,
    describe_modules,
    layer_verdict,
    logit_verdict,
    merge_warning,
    module_verdict,
    overall_verdict,
    refine_with_layers,
    scale_hint,
)

LIMITS = Thresholds()
# float32 on the bundled model: noise ~1e-8, a missing or doubled LoRA ~1 (big) or ~1e-6 (2e-3).
RESOLVED = Resolution(noise_kl=1e-8, missing_kl=1.0, doubled_kl=2.0, min_signal_to_noise=16)
# bf16 at ‖ΔW‖/‖W0‖ = 2e-3: the failure signal is as small as the noise.
UNRESOLVED = Resolution(noise_kl=2.9e-5, missing_kl=2.4e-5, doubled_kl=4.3e-5, min_signal_to_noise=16)


def test_resolution_limit_sits_between_noise_and_signal():
    assert RESOLVED.resolves and not UNRESOLVED.resolves
    assert RESOLVED.kl_limit == pytest.approx(1e-4)  # sqrt(1e-8 · 1)
    assert RESOLVED.scale_resolution == pytest.approx(1e-4)
    edge = Resolution(noise_kl=1e-6, missing_kl=16e-6, doubled_kl=1.0, min_signal_to_noise=16)
    assert edge.resolves and edge.kl_limit == pytest.approx(4e-6) and edge.scale_resolution == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("kl_mean", "fit", "expected"),
    [
        (1e-7, ScaleFit(1.0, 1e-7), "ok"),
        (0.5, ScaleFit(2.0, 1e-8), "double_counted"),
        (0.5, ScaleFit(0.02, 1e-8), "missing"),
        (0.5, ScaleFit(1.41, 1e-8), "scaled"),
        (0.5, ScaleFit(1.0, 0.2), "diverged"),
        (0.5, ScaleFit(1.0, 1e-8), "diverged"),
        # The best scale at the end of the fitted range: unhealthy, but no scale is named.
        (0.5, ScaleFit(4.0, 1e-8, at_edge=True), "diverged"),
    ],
)
def test_logit_verdict_when_the_logits_resolve_the_lora(kl_mean, fit, expected):
    assert logit_verdict(kl_mean, fit, RESOLVED, LIMITS) == expected


def test_a_kl_under_the_noise_is_never_ok_when_the_logits_cannot_see_the_lora():
    # bf16 at 2e-3: a missing LoRA measured KL 1.1e-5, under every loose constant of old.
    assert logit_verdict(1.1e-5, ScaleFit(0.3, 1e-5), UNRESOLVED, LIMITS) == "unresolved"


def test_noise_and_signal_come_from_the_logit_pass_or_the_dtype_prior():
    reference_kl = {0.0: 2.4e-5, 2.0: 4.3e-5}
    measured = measure_resolution(reference_kl, LIMITS, noise_kl=2.9e-5)
    assert (measured.noise_kl, measured.missing_kl, measured.doubled_kl) == (2.9e-5, 2.4e-5, 4.3e-5)
    assert measured.noise_source == MEASURED and not measured.resolves
    prior = measure_resolution(reference_kl, Thresholds.for_dtype("bfloat16"))
    assert prior.noise_source == PRIOR and prior.noise_kl == Thresholds.for_dtype("bfloat16").noise_kl


def test_half_precision_assumes_more_noise():
    assert Thresholds.for_dtype("bfloat16").noise_kl > Thresholds.for_dtype("float32").noise_kl


def test_override_replaces_known_and_rejects_unknown_thresholds():
    assert LIMITS.override({"min_signal_to_noise": 100}).min_signal_to_noise == 100
    with pytest.raises(ValueError, match="unknown threshold"):
        LIMITS.override({"kl_meen": 1.0})


def test_overall_verdict_fails_on_any_unhealthy_phase():
    assert overall_verdict(["ok", "ok"]) == "pass"
    assert overall_verdict(["ok", "double_counted"]) == "fail"
    assert overall_verdict(["ok", "unresolved"]) == "fail"


def test_modules_decide_and_logits_only_add_what_the_modules_cannot_see():
    assert refine_with_layers("ok", ["ok", "double_counted"]) == "partial"
    assert refine_with_layers("double_counted", ["double_counted", "missing"]) == "partial"
    assert refine_with_layers("ok", ["missing", "missing"]) == "missing"
    assert refine_with_layers("unresolved", ["double_counted", "double_counted"]) == "double_counted"
    assert refine_with_layers("unresolved", ["ok", "ok"]) == "ok"
    # Every module right, yet no LoRA scale explains the logits: something outside the LoRA modules.
    assert refine_with_layers("diverged", ["ok", "ok"]) == "diverged"
    # A scale the logits see is the merge's rounding when every module holds what it should.
    assert refine_with_layers("scaled", ["ok", "ok"]) == "ok"
    # Some targeted modules were not read: the logits keep their say.
    assert refine_with_layers("unresolved", ["ok", "ok"], complete=False) == "unresolved"
    assert refine_with_layers("missing", [], complete=False) == "missing"


def parts(base, slot, base_residual=0.0, slot_residual=0.0, merge_kept=1.0, rounding=0.0):
    return SimpleNamespace(base_part=base, slot_part=slot, base_residual=base_residual, slot_residual=slot_residual,
                           merge_kept=merge_kept, rounding=rounding)


@pytest.mark.parametrize(
    ("figures", "expected"),
    [
        (parts(1.0, 0.0), "ok"),  # merged
        (parts(0.0, 1.0), "ok"),  # adapter
        (parts(1.0, 1.0), "double_counted"),  # merged base + adapter (ms-swift #8233)
        (parts(0.0, 0.0), "missing"),
        (parts(2.0, 0.0), "double_counted"),  # merged twice
        (parts(0.5, 0.0), "scaled"),
        (parts(0.0, 0.25), "scaled"),
        (parts(1.0, 0.0, base_residual=0.1), "diverged"),
        (parts(0.0, 1.0, slot_residual=0.1), "diverged"),
        # bf16 at 2e-3: an ulp of W0 is ~3.9‖ΔW‖; a merge rounded in another order (residual 1.4)
        # is still a merge, with or without the adapter on top.
        (parts(0.85, 0.0, base_residual=1.4, merge_kept=0.7, rounding=3.9), "ok"),
        (parts(0.85, 1.0, base_residual=1.4, merge_kept=0.7, rounding=3.9), "double_counted"),
        # More than an ulp per element away from any merge: not a merge of W0 + ΔW.
        (parts(1.0, 0.0, base_residual=5.0, rounding=3.9), "diverged"),
        # Rounding so large that merged and unmerged cannot be told apart.
        (parts(1.0, 0.0, base_residual=1.9, rounding=3.9), "unresolved"),
    ],
)
def test_module_verdict_names_the_parts_each_module_holds(figures, expected):
    assert module_verdict(figures, Thresholds.for_dtype("bfloat16") if figures.rounding else LIMITS) == expected


def test_layer_verdict_names_the_multiple_of_delta_the_module_holds():
    assert layer_verdict(1.0, 1e-7, 1e-7, LIMITS) == "ok"
    assert layer_verdict(2.0, 1e-7, 1.0, LIMITS) == "double_counted"
    assert layer_verdict(0.0, 1e-7, 1.0, LIMITS) == "missing"
    assert layer_verdict(1.5, 1e-7, 0.5, LIMITS) == "scaled"
    assert layer_verdict(1.0, 0.05, 0.05, LIMITS) == "diverged"


def test_a_merge_that_loses_a_tenth_of_delta_is_worth_a_warning():
    merged = [parts(1.0, 0.0, merge_kept=k) for k in (0.70, 0.85, 0.97)]
    warning = merge_warning(merged, LIMITS)
    assert warning and "keep 84% of ΔW (70%–97% per module)" in warning
    assert merge_warning([parts(1.0, 0.0, merge_kept=0.996)], LIMITS) is None
    # An adapter slot keeps ΔW exactly: what a merge would lose is not this phase's loss.
    assert merge_warning([parts(0.0, 1.0, merge_kept=0.7)], LIMITS) is None


def test_wrong_modules_are_named_by_layer_range_and_kind():
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
    hint = scale_hint(factor, r, alpha, rslora)
    assert (hint is None) if needle is None else (needle in hint)
