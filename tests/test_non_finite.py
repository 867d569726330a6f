"""Non-finite figures in the verdict rules (pure logic): NaN or Inf never crashes `round()` and is never
read as a LoRA scale; it is the `non_finite` verdict, with the modules that hold it named."""

import math
from types import SimpleNamespace

from lora_doctor.catalog import CATALOG
from lora_doctor.measure.metrics import ScaleFit
from lora_doctor.measure.noise import Resolution
from lora_doctor.measure.verdict import (
    NON_FINITE,
    OK,
    Thresholds,
    describe_modules,
    layer_verdict,
    logit_verdict,
    module_verdict,
    refine_with_layers,
)

LIMITS = Thresholds()
RESOLVED = Resolution(noise_kl=1e-8, missing_kl=1.0, doubled_kl=2.0, min_signal_to_noise=16)
NAN, INF = math.nan, math.inf


def parts(base=0.0, slot=1.0, base_residual=0.0, slot_residual=0.0, merge_kept=1.0):
    return SimpleNamespace(base_part=base, slot_part=slot, base_residual=base_residual, slot_residual=slot_residual, merge_kept=merge_kept, rounding=1e-7)


def test_nan_slot_is_non_finite_not_a_crash():
    # A NaN adapter in the engine's slot: every sum over it is NaN.
    assert module_verdict(parts(slot=NAN, slot_residual=NAN), LIMITS) == NON_FINITE
    assert module_verdict(parts(base=INF), LIMITS) == NON_FINITE
    assert module_verdict(parts(), LIMITS) == OK  # the same figures, finite


def test_nan_whole_weight_figures_are_non_finite_not_scaled():
    # The audit's rule: NaN once read `scaled` (every comparison with NaN is false).
    assert layer_verdict(NAN, NAN, NAN, LIMITS) == NON_FINITE
    assert layer_verdict(1.0, INF, 0.0, LIMITS) == NON_FINITE


def test_nan_logits_are_non_finite_whatever_the_fit():
    # A probe on a trainer whose loss diverged: its reference log-probs, so every KL, are NaN.
    fit = ScaleFit(scale=0.0, kl=NAN, at_edge=False)
    assert logit_verdict(NAN, fit, RESOLVED, LIMITS) == NON_FINITE
    assert logit_verdict(1e-9, ScaleFit(scale=1.0, kl=1e-9, at_edge=False), RESOLVED, LIMITS) == OK


def test_one_non_finite_module_names_the_phase_and_is_listed():
    verdicts = [OK] * 13 + [NON_FINITE]
    assert refine_with_layers(OK, verdicts) == NON_FINITE
    assert refine_with_layers(NON_FINITE, [OK, OK]) == NON_FINITE
    modules = [(f"model.layers.{i}.self_attn.q_proj", v) for i, v in enumerate(verdicts)]
    assert describe_modules(modules) == "non finite in 1/14 modules: layer 13 (q_proj)"


def test_non_finite_has_a_cause_for_checks_and_for_exports():
    assert "NaN" in CATALOG[NON_FINITE].cause and "NaN" in CATALOG[NON_FINITE].audit_cause
