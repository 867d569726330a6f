"""Thresholds → verdicts. Every threshold lives here, with the reason for its value."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .modules import layer_index, module_kind

OK = "ok"
DOUBLE_COUNTED = "double_counted"
MISSING = "missing"
STALE = "stale"
SCALED = "scaled"
DIVERGED = "diverged"
PARTIAL = "partial"
PHASE_VERDICTS = (OK, DOUBLE_COUNTED, MISSING, STALE, SCALED, PARTIAL, DIVERGED)

PASS = "pass"
FAIL = "fail"

EXPLANATIONS = {
    OK: "the engine computes the checkpoint's policy W0 + ΔW",
    DOUBLE_COUNTED: "the engine applies the LoRA twice (W0 + 2ΔW): merged weights were loaded as the base "
    "and the adapter was added on top (ms-swift #8233)",
    MISSING: "the engine runs the base model without the LoRA (W0): the adapter was dropped or never loaded",
    STALE: "the engine still holds an older adapter",
    SCALED: "the engine applies the LoRA at the wrong scale (W0 + c·ΔW)",
    DIVERGED: "the engine's outputs are not explained by the checkpoint at any LoRA scale",
    PARTIAL: "only some LoRA modules are wrong in the engine (a sync that skipped or misnamed modules)",
}


# The usual cause of each verdict and what to do about it, printed under the table and in reports.
CAUSES = {
    DOUBLE_COUNTED: "merged weights (W0 + ΔW) were pushed as the engine's base and the adapter was then added on top; "
    "fix: sync the unmerged base (or never add the adapter after a merged sync) — ms-swift >= 4.0.2 (PR #8275)",
    MISSING: "the engine lost the LoRA: a sleep-mode wake-up or reload restored the base from disk, or the adapter was "
    "never passed with the generate call; fix: re-sync after every reload and pass the LoRA request",
    STALE: "a new adapter was synced under an id the engine had already cached, without load_inplace=True; "
    "fix: use a fresh lora_int_id per sync or load_inplace=True",
    SCALED: "trainer and engine compute the LoRA scaling differently (rsLoRA alpha/sqrt(r) vs alpha/r, alpha_pattern / "
    "rank_pattern); fix: make both read the same adapter_config",
    PARTIAL: "some modules were not synced or were synced under a wrong name (prefix, packed q/k/v or gate/up slices); "
    "fix: compare the names your sync sends with the engine's module names",
    DIVERGED: "weights differ from W0 + ΔW in a way no LoRA scale explains: a different base, precision drift from "
    "repeated merge/unmerge in bf16, or corrupted tensors; fix: sync from a float32 master copy, check the base",
}


@dataclass(frozen=True)
class Thresholds:
    """Limits that turn measurements into verdicts; `for_dtype` picks defaults per precision."""

    # Mean KL(reference ‖ engine) per token above which a phase is not healthy. float32: a correct
    # engine measured ~1e-7 against the reference on CPU, so 1e-4 leaves three decades of margin.
    kl_mean: float = 1e-4
    # KL at the fitted scale above which no LoRA scale explains the engine (→ diverged).
    # Ten times kl_mean: a uniform wrong scale is explained to float precision; a partial or
    # corrupted sync is not.
    kl_unexplained: float = 1e-3
    # How close the fitted scale must be to 2 / 0 to be named double_counted / missing.
    scale_tolerance: float = 0.1
    # Per module, |α_layer − 1| above which the engine holds a wrong multiple of ΔW. float32 weights
    # read back from the engine matched W0 + ΔW to ~1e-7 relative, so 1e-2 is far above noise.
    layer_scale_tolerance: float = 1e-2
    # Per module, ‖W_eng − (W0 + ΔW)‖ / ‖ΔW‖ above which the module is wrong (float32: ~1e-7 seen).
    layer_divergence: float = 1e-3

    @classmethod
    def for_dtype(cls, dtype: str) -> Thresholds:
        if dtype in ("bfloat16", "float16", "half"):
            # Half precision rounds every weight and activation (~3 significant digits in bf16):
            # reference and engine disagree at ~1e-3 per token even when the sync is right.
            # vLLM keeps LoRA buffers in bf16: per-module scale ~2e-4 off and divergence ~2.4e-3
            # were measured for a correct bf16 sync.
            return cls(
                kl_mean=2e-2,
                kl_unexplained=1e-1,
                scale_tolerance=0.15,
                layer_scale_tolerance=2e-2,
                layer_divergence=2e-2,
            )
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


def phase_verdict(kl_mean: float, fitted_scale: float, fitted_kl: float, thresholds: Thresholds) -> str:
    """Name what the engine computes in one phase, from logits alone."""
    if kl_mean <= thresholds.kl_mean:
        return OK
    if fitted_kl > thresholds.kl_unexplained:
        return DIVERGED
    if abs(fitted_scale - 2.0) <= thresholds.scale_tolerance:
        return DOUBLE_COUNTED
    if abs(fitted_scale) <= thresholds.scale_tolerance:
        return MISSING
    if abs(fitted_scale - 1.0) <= thresholds.scale_tolerance:
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
    """Name what the engine holds for one module, from its weights."""
    if effective_scale is None or divergence is None:
        return OK
    if abs(effective_scale - 1.0) <= thresholds.layer_scale_tolerance and divergence <= thresholds.layer_divergence:
        return OK
    if residual is not None and residual > thresholds.layer_divergence:
        return DIVERGED  # not a multiple of ΔW
    if abs(effective_scale - 2.0) <= thresholds.scale_tolerance:
        return DOUBLE_COUNTED
    if abs(effective_scale) <= thresholds.scale_tolerance:
        return MISSING
    return SCALED


def refine_with_layers(logit_verdict: str, layer_verdicts: list[str]) -> str:
    """Combine the logit verdict with what the engine holds per module.

    Some modules wrong and others right (or wrong in different ways) is `partial`, whatever the
    logits say. Every module wrong in the same way names the phase even when the logits barely
    move (a weak LoRA).
    """
    wrong = {v for v in layer_verdicts if v != OK}
    if not wrong:
        return logit_verdict
    if OK in layer_verdicts or len(wrong) > 1:
        return PARTIAL
    return wrong.pop() if logit_verdict == OK else logit_verdict


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


def overall_verdict(phase_verdicts: list[str]) -> str:
    return PASS if all(v == OK for v in phase_verdicts) else FAIL
