"""Thresholds → verdicts. Every threshold lives here, with the reason for its value; the verdicts' names,
meanings and causes live in the catalog (`lora_doctor/catalog.py`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..adapter.modules import layer_index, module_kind
from ..catalog import (
    DECODE_DIVERGED,
    DIVERGED,
    DOUBLE_COUNTED,
    FAIL,
    MISSING,
    NON_FINITE,
    OK,
    PARTIAL,
    PASS,
    PHASE_VERDICTS,
    SCALED,
    STALE_CACHE,
    UNRESOLVED,
)


@dataclass(frozen=True)
class Thresholds:
    """Limits that turn measurements into verdicts; `for_dtype` picks defaults per precision.

    The logit limits are not constants: every run measures its own noise (engine vs reference where
    they must agree) and signal (what a missing or doubled LoRA does to the reference), and the
    limits follow from their ratio (`noise.Resolution`). The per-module limits grow with the engine
    dtype's rounding of W0 measured against ΔW (`rounding`, per module), not with ‖ΔW‖ alone.
    """

    # The logits resolve the LoRA when the smallest whole-LoRA failure (missing, doubled) moves the
    # KL by at least this many times the noise. At 16, α is known to sqrt(noise/signal) ≤ 0.25, so
    # 0, 1 and 2 are ≥ 4 resolutions apart, and the KL limit (the geometric mean of noise and
    # signal) sits ≥ 4× above the noise and ≥ 4× below the signal.
    min_signal_to_noise: float = 16.0
    # Engine-vs-reference KL noise assumed when the run cannot measure its own (a probe on a
    # trainer's engine, whose base is not known to be untouched): about twice the noise measured on
    # the bundled models (float32 0.9–1.5e-8, bf16 2.4–2.9e-5 on CPU).
    noise_kl: float = 3e-8
    # Floor of how close the fitted α must be to 2 / 0 to be named double_counted / missing (the
    # run's own α resolution widens it).
    scale_tolerance: float = 0.1
    # Per module, how far base_part / slot_part may sit from 0 or 1. Exact syncs measure within 1e-3;
    # a base that is not exactly a merge in the engine's dtype widens it (see part_noise_share).
    part_tolerance: float = 0.05
    # Per module, part of the base's residual added to part_tolerance: a merge rounded in another
    # order (float32 master weights cast to bf16, on a float32 base) moved base_part by at most 0.17×
    # its residual on the bundled weights (‖ΔW‖/‖W0‖ 5e-4 to 1e-2).
    part_noise_share: float = 0.25
    # Per module, |α_layer − 1| above which the engine's whole weight holds a wrong multiple of ΔW
    # (`layer_verdict`, for weights compared without the base/slot split). float32 weights read back
    # from the engine matched W0 + ΔW to ~1e-7 relative, so 1e-2 is far above noise.
    layer_scale_tolerance: float = 1e-2
    # Per module, the residual (over ‖ΔW‖) above which a part is not a multiple of what it should
    # hold (float32: ~1e-7 seen).
    layer_divergence: float = 1e-3
    # Per module, the base's residual limit adds this many `rounding`s (one ulp of every element over
    # ‖ΔW‖): two correct roundings of the same merge differ by at most one ulp per element, so a base
    # beyond that is not any merge of W0 + ΔW. Measured: merges in another order left 0.13–0.37 of it
    # (‖ΔW‖/‖W0‖ 5e-4 to 1e-2). An audit adds as many to an export module's residual and divergence
    # limit, its `rounding` over the kept part of ΔW: a bf16 export's correct merges left 0.03–0.08 of
    # ‖D‖ against rounding 0.76–3.0, a double merge saved in bf16 0.36–1.25 beside its α of 2.
    rounding_margin: float = 1.0
    # A merged sync that keeps less than this part of ΔW (bf16 rounds away what is below half an ulp
    # of W0) gets a warning: it is what the trainer's merge holds, so not a failed sync, but a policy
    # whose every update loses more than a tenth of its LoRA step no longer trains what it measures
    # (trl #6688). Measured: 99.8% kept at ‖ΔW‖/‖W0‖ ≈ 1e-2, 84% (70–97% per module) at 2e-3.
    merge_kept_warning: float = 0.9

    @classmethod
    def for_dtype(cls, dtype: str) -> Thresholds:
        if dtype in ("bfloat16", "float16", "half"):
            # vLLM keeps LoRA buffers in the model's dtype: per-module scale ~2e-4 off and residual
            # ~2.4e-3 were measured for a correct bf16 adapter slot.
            return cls(noise_kl=5e-5, scale_tolerance=0.15, layer_scale_tolerance=2e-2, layer_divergence=2e-2)
        return cls()

    def override(self, values: dict[str, float]) -> Thresholds:
        """A copy with some thresholds replaced; unknown names are a ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown threshold {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return replace(self, **values)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def logit_verdict(kl_mean: float, fit, resolution, thresholds: Thresholds) -> str:
    """Name what the engine computes in one phase from its logits alone, or UNRESOLVED when this
    run's noise hides the LoRA. `fit` is a `metrics.ScaleFit`, `resolution` a `noise.Resolution`."""
    if not finite(kl_mean, fit.scale, fit.kl):
        return NON_FINITE
    if not resolution.resolves:
        return UNRESOLVED
    limit = resolution.kl_limit
    if kl_mean <= limit:
        return OK
    if fit.at_edge or fit.kl > limit:
        # No scale in the fitted range explains the engine: unhealthy, but no scale to name.
        return DIVERGED
    tolerance = max(thresholds.scale_tolerance, 2 * resolution.scale_resolution)
    if abs(fit.scale - 2.0) <= tolerance:
        return DOUBLE_COUNTED
    if abs(fit.scale) <= tolerance:
        return MISSING
    if abs(fit.scale - 1.0) <= tolerance:
        # The right scale yet the wrong outputs: not a LoRA-scale problem.
        return DIVERGED
    return SCALED


def scale_hint(factor: float, r: int, lora_alpha: float, use_rslora: bool) -> str | None:
    """Name a scale factor that matches a known scaling confusion (within 5%), if any."""
    plain, rs = lora_alpha / r, lora_alpha / math.sqrt(r)
    own = rs if use_rslora else plain
    known = [
        (plain / rs, "= 1/sqrt(r): an rsLoRA adapter scaled as plain LoRA (alpha/r instead of alpha/sqrt(r))"),
        (rs / plain, "= sqrt(r): a plain LoRA adapter scaled as rsLoRA (alpha/sqrt(r) instead of alpha/r)"),
        (1 / own, f"= 1/scaling: the LoRA scaling ({own:g}) was dropped (B·A applied unscaled)"),
        (own, f"= scaling: the LoRA scaling ({own:g}) was applied twice"),
    ]
    for value, hint in known:
        if value != 1.0 and abs(factor - value) <= 0.05 * abs(value):
            return hint
    return None


def layer_verdict(effective_scale: float | None, residual: float | None, divergence: float | None, thresholds: Thresholds) -> str:
    """Name what a whole weight holds for one module against W0 + ΔW, from `effective_scale`,
    `residual` and `divergence` (over ‖ΔW‖). For weights without a base/slot split; the engine's
    per-module read uses `module_verdict`."""
    if effective_scale is None or divergence is None:
        return OK
    if not finite(effective_scale, residual, divergence):
        return NON_FINITE
    if abs(effective_scale - 1.0) <= thresholds.layer_scale_tolerance and divergence <= thresholds.layer_divergence:
        return OK
    if residual is not None and residual > thresholds.layer_divergence:
        return DIVERGED  # not a multiple of ΔW
    return _name_scale(effective_scale, thresholds.scale_tolerance)


def module_verdict(figures, thresholds: Thresholds) -> str:
    """Name what the engine holds for one module from its two parts (`lora_delta.module_figures`
    or a `ModuleResult`): base_part (0 unmerged, 1 merged in the engine's dtype) and slot_part
    (0 no adapter, 1 the adapter). A double count is a merged base plus a loaded slot."""
    base, slot = figures.base_part, figures.slot_part
    if base is None or slot is None:
        return OK  # ΔW = 0: nothing to hold
    if not finite(base, slot, figures.base_residual, figures.slot_residual, figures.merge_kept):
        return NON_FINITE  # round() of a NaN fails; a NaN read as a scale would name a wrong one
    if figures.slot_residual > thresholds.layer_divergence:
        return DIVERGED  # the slot holds something other than a multiple of ΔW
    if figures.base_residual > thresholds.layer_divergence + thresholds.rounding_margin * (figures.rounding or 0.0):
        return DIVERGED  # the base differs from W0 and from a merge by more than rounding
    base_tolerance = thresholds.part_tolerance + thresholds.part_noise_share * figures.base_residual
    if base_tolerance >= 0.5:
        return UNRESOLVED  # rounding hides whether the base holds ΔW
    base_units = round(base) if abs(base - round(base)) <= base_tolerance else None
    slot_units = round(slot) if abs(slot - round(slot)) <= thresholds.part_tolerance else None
    if base_units is not None and slot_units is not None:
        total = base_units + slot_units
        if total == 1 and min(base_units, slot_units) == 0:
            return OK
        if total in (0, 2):
            return MISSING if total == 0 else DOUBLE_COUNTED
    return _name_scale(base * (figures.merge_kept or 1.0) + slot, thresholds.scale_tolerance)


def _name_scale(scale: float, tolerance: float) -> str:
    if abs(scale - 2.0) <= tolerance:
        return DOUBLE_COUNTED
    if abs(scale) <= tolerance:
        return MISSING
    return SCALED


def refine_with_layers(logit_verdict: str, layer_verdicts: list[str], complete: bool = True) -> str:
    """Combine the logit verdict with what the engine holds per module.

    The per-module figures are direct evidence: some modules wrong and others right (or wrong in
    different ways) is `partial`; every module wrong in the same way names the phase. Every module
    right leaves the logits one say only: a phase they resolve and no LoRA scale explains
    (`diverged`, something outside the LoRA modules). When some targeted modules were not read
    (`complete` false) or their read is unresolved, the logit verdict stands (it may be unresolved).
    """
    if not layer_verdicts:
        return logit_verdict
    if NON_FINITE in layer_verdicts or logit_verdict == NON_FINITE:
        return NON_FINITE  # whatever else holds, these modules hold no number to judge
    known = [v for v in layer_verdicts if v != UNRESOLVED]
    wrong = {v for v in known if v != OK}
    if OK in known and wrong or len(wrong) > 1:
        return PARTIAL
    if wrong:
        return wrong.pop()
    if len(known) < len(layer_verdicts) or not complete:
        return logit_verdict  # modules the read could not decide: only the logits can
    return DIVERGED if logit_verdict == DIVERGED else OK


def finite(*values: float | None) -> bool:
    """No NaN or ±Inf among the figures given (None: not measured)."""
    return all(v is None or math.isfinite(v) for v in values)


def describe_modules(modules: list[tuple[str, str]]) -> str:
    """`(module name, verdict)` pairs → "double counted in 7/14 modules: layer 0; …" for the wrong ones."""
    total = len(modules)
    parts = []
    for verdict in PHASE_VERDICTS:
        names = [name for name, v in modules if v == verdict and v != OK]
        if names:
            parts.append(f"{verdict.replace('_', ' ')} in {len(names)}/{total} modules: {_layer_ranges(names)}")
    return "; ".join(parts)


def _layer_ranges(names: list[str]) -> str:
    """Module names → "layers 0–6 (k_proj, q_proj)"; names without a layer index are listed as they are."""
    indices = sorted({i for n in names if (i := layer_index(n)) is not None})
    if not indices:
        return ", ".join(sorted(names))
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    spans = ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)
    kinds = ", ".join(sorted({module_kind(n) for n in names}))
    return f"{'layer' if len(indices) == 1 else 'layers'} {spans} ({kinds})"


def decode_verdict(decode_kl: float, decode_kl_no_cache: float, kl_limit: float) -> str:
    """Name a phase whose weights and prompt log-probs are right but whose rollouts are not (mean
    decode KL above `kl_limit`), from the same requests made without reading the prefix cache: they
    agree, so the cache served blocks of another policy (`stale_cache`); they disagree too, so the
    engine's generation path itself computes another policy (`decode_diverged`)."""
    if not decode_kl > kl_limit:
        return OK
    return STALE_CACHE if decode_kl_no_cache <= kl_limit else DECODE_DIVERGED


def overall_verdict(phase_verdicts: list[str]) -> str:
    return PASS if all(v == OK for v in phase_verdicts) else FAIL


def decided_by(resolution, modules_read: bool) -> str:
    """What the phase's verdict rests on: the logits when they resolve the LoRA, the per-module
    figures when read, both, or nothing (then the verdict is unresolved)."""
    sources = [name for name, used in (("logits", resolution.resolves), ("modules", modules_read)) if used]
    return " and ".join(sources) or "nothing"


def resolution_note(resolution, fit, modules_read: bool) -> str | None:
    """Why the logits had no say, or why their fitted α was not named, if so."""
    if not resolution.resolves:
        where = "decided from the per-module figures" if modules_read else "and no per-module figures were read"
        return (
            f"the logits cannot resolve this LoRA at this precision: signal/noise {resolution.signal_to_noise:.1f} "
            f"< {resolution.min_signal_to_noise:g}; {where}"
        )
    if fit.at_edge:
        return f"the best-fitting α ({fit.scale:.3f}) is at the edge of the fitted range: no scale named"
    return None


def merge_warning(layers, thresholds: Thresholds) -> str | None:
    """A warning when the phase's base holds a merge that lost much of ΔW to rounding.

    Only the modules whose base holds a merged sync count; an adapter slot keeps ΔW exactly."""
    # Closer to a merge than to W0: the base holds a merged sync.
    kept = [layer.merge_kept for layer in layers if layer.base_part is not None and abs(layer.base_part - 1) < 0.5]
    if not kept:
        return None
    mean = sum(kept) / len(kept)
    if mean >= thresholds.merge_kept_warning:
        return None
    return (
        f"the merged weights keep {mean:.0%} of ΔW ({min(kept):.0%}–{max(kept):.0%} per module): the engine's dtype "
        "rounds away every part of ΔW below half an ulp of W0, so each merged sync loses the rest of the LoRA step "
        "(trl #6688); sync the adapter instead (its slot keeps ΔW exactly) or serve the engine in float32"
    )
