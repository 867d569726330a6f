"""The per-module grid every renderer shows: a row per decoder layer, a column per module kind."""

from __future__ import annotations

from ..modules import layer_index, module_kind
from ..result import LayerResult, PhaseResult


def layer_label(module: str) -> str:
    """"model.layers.3.self_attn.q_proj" → "3"; a module without a layer index keeps its parent's name."""
    index = layer_index(module)
    if index is not None:
        return str(index)
    return module.rpartition(".")[0] or module


def layer_grid(layers: list[LayerResult]) -> tuple[list[str], list[tuple[str, dict[str, LayerResult]]]]:
    """Module kinds in report order, and a row per layer label mapping kind → module (report order)."""
    kinds: list[str] = []
    rows: dict[str, dict[str, LayerResult]] = {}
    for layer in layers:
        kind = module_kind(layer.module)
        if kind not in kinds:
            kinds.append(kind)
        rows.setdefault(layer_label(layer.module), {})[kind] = layer
    return kinds, list(rows.items())


def wrong_layers(phase: PhaseResult) -> list[LayerResult]:
    return [layer for layer in phase.layers if layer.verdict != "ok"]


def parts_summary(phase: PhaseResult) -> str:
    """"base 1.000–1.000, slot 0.000–0.000": the range of each part over the phase's modules."""
    spans = []
    for label, values in (("base", [layer.base_part for layer in phase.layers]), ("slot", [layer.slot_part for layer in phase.layers])):
        known = [v for v in values if v is not None]
        spans.append(f"{label} {min(known):.3f}–{max(known):.3f}" if known else f"{label} —")
    return ", ".join(spans)


def modules_line(phase: PhaseResult) -> str | None:
    """The one line for a phase whose read modules all hold what they should; None when some are wrong."""
    if wrong_layers(phase):
        return None
    targeted = len(phase.layers) + len(phase.modules_not_read)
    count = f"all {len(phase.layers)}" if not phase.modules_not_read else f"{len(phase.layers)} of {targeted} targeted"
    kept = f"; a merge in the engine's dtype keeps {phase.merge_kept:.0%} of ΔW" if phase.merge_kept is not None and phase.merge_kept < 0.9995 else ""
    return f"{count} LoRA modules hold W0 + ΔW ({parts_summary(phase)}{kept})"


def not_read_lines(phase: PhaseResult) -> list[str]:
    return [f"{entry['module']}: not read — {entry['reason']}" for entry in phase.modules_not_read]


def resolution_line(resolution: dict) -> str | None:
    """What the run's noise and signal allow, in one sentence."""
    if not resolution:
        return None
    figures = (
        f"logit noise {resolution['noise_kl']:.2g} ({resolution['noise_source']}), signal {min(resolution['missing_kl'], resolution['doubled_kl']):.2g}, "
        f"S/N {resolution['signal_to_noise']:.3g}"
    )
    if resolution["logits_resolve"]:
        return f"{figures}: the logits resolve the LoRA; healthy below KL {resolution['kl_limit']:.2g}"
    return (
        f"{figures} < {resolution['min_signal_to_noise']:g}: the logits cannot resolve this LoRA at this precision "
        "(a fitted α in parentheses is noise); verdicts come from the per-module figures"
    )
