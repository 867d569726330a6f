"""What more than one renderer shows the same way: figures, the phase table's cells, the per-module grid."""

from __future__ import annotations

import math
from html import escape

from ..adapter.modules import layer_index, module_kind
from ..catalog import OK
from ..result import ModuleResult, PhaseResult, Report

ENVIRONMENT_KEYS = ("python", "torch", "vllm", "transformers", "peft", "device", "reference_device")
PHASE_COLUMNS = ("#", "phase", "adapter", "verdict", "α", "KL mean", "KL max", "KL at α", "top-1", "greedy")


# ---------------------------------------------------------------------------------------------
# Values.


def fmt(value: object, spec: str) -> str:
    """`value` formatted with `spec`; "—" for a missing value, "nan"/"inf" kept readable."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, float) and math.isinf(value):
            return "∞" if value > 0 else "−∞"
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def finite_or_none(value: object) -> float | None:
    """A finite float, or None (a chart draws nothing for a missing or non-finite value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def esc(value: object) -> str:
    """Text for HTML: the HTML page, its charts, and the raw `<summary>` lines inside Markdown."""
    return escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------
# The report's sections.


def preflight_findings(report: Report) -> list[dict]:
    """Pre-flight findings, problems first (a report from before pre-flight has none)."""
    order = {"problem": 0, "warning": 1, "info": 2}
    findings = list(getattr(report, "preflight", None) or [])
    return sorted(findings, key=lambda f: order.get(str(f.get("severity")), 3))


def has_previous(report: Report) -> bool:
    """Whether any phase was also compared with a previous checkpoint (adds a "KL vs previous" column)."""
    return any(getattr(phase, "kl_previous", None) is not None for phase in report.phases)


def phase_columns(report: Report) -> list[str]:
    return [*PHASE_COLUMNS, "KL vs previous"] if has_previous(report) else list(PHASE_COLUMNS)


def phase_figures(phase: PhaseResult, previous: bool = False) -> list[str]:
    """The phase table's cells, formatted the same in every view."""
    cells = [
        str(phase.index + 1),
        phase.name,
        "yes" if phase.with_adapter else "no",
        phase.verdict,
        _logit_scale(phase),
        fmt(phase.kl_mean, ".2e"),
        fmt(phase.kl_max, ".2e"),
        fmt(phase.kl_at_scale, ".2e"),
        fmt(phase.top1_agreement, ".1%"),
        fmt(phase.greedy_match, ".0%"),
    ]
    if previous:
        cells.append(fmt(getattr(phase, "kl_previous", None), ".2e"))
    return cells


def _logit_scale(phase: PhaseResult) -> str:
    """The fitted α, in parentheses when the logits cannot resolve the LoRA (it is then noise)."""
    value = fmt(phase.effective_scale, ".3f")
    # An audit's α comes from the weights alone (no logits measured): nothing to mark.
    return value if phase.kl_mean is None or "logits" in phase.decided_by else f"({value})"


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


# The decode path (what the rollouts see) beside the prompt path, one row per phase.
DECODE_COLUMNS = (
    "#", "phase", "decode KL mean", "decode KL max", "|Δ log-prob| mean", "|Δ log-prob| max", "tokens", "cache blocks", "KL without cache", "base route KL",
)


def has_decode(report: Report) -> bool:
    """Whether the report measured the decode path (reports from before it did not)."""
    return any(getattr(phase, "decode_kl_mean", None) is not None for phase in report.phases)


def decode_figures(phase: PhaseResult) -> list[str]:
    """The decode table's cells: KL and |log-prob difference| of the generated tokens, the A/B
    without the prefix cache (when measured) and the base route's KL against W0 (with an adapter)."""
    return [
        str(phase.index + 1),
        phase.name,
        fmt(phase.decode_kl_mean, ".2e"),
        fmt(phase.decode_kl_max, ".2e"),
        fmt(phase.decode_logprob_diff_mean, ".2e"),
        fmt(phase.decode_logprob_diff_max, ".2e"),
        fmt(phase.decode_positions, "d"),
        fmt(getattr(phase, "decode_cache_blocks", None), "d"),
        fmt(phase.decode_kl_no_cache, ".2e"),
        fmt(phase.base_route_kl, ".2e"),
    ]


def not_measured_lines(report: Report) -> list[str]:
    """"phase 1 adapter: stale_cache not measured — why", for what each phase could not measure."""
    return [
        f"phase {phase.index + 1} {phase.name}: {what} not measured — {why}"
        for phase in report.phases
        for what, why in phase.not_measured.items()
    ]


def engine_items(report: Report) -> list[tuple[str, str]]:
    """The options the engine ran with, the trainer's marked "(given)", and the prefix cache's reach."""
    engine = getattr(report, "engine", None) or {}
    given = engine.get("given", {})
    items = [(key, f"{fmt(value, '')}{' (given)' if key in given else ''}") for key, value in engine.get("options", {}).items()]
    items += [(key, f"{fmt(value, '')} (given)") for key, value in given.items() if key not in engine.get("options", {})]
    if engine:
        items.append(("prefix cache", cache_line(engine)))
    return items


def cache_line(engine: dict) -> str:
    """Whether the check's requests could read the prefix cache at all."""
    options = engine.get("options", {})
    if not options.get("enable_prefix_caching"):
        return "off: no request reads cached KV blocks"
    if engine.get("cache_exercised"):
        return f"exercised: the prompts' requests can read {engine['cache_blocks']} full {options.get('block_size')}-token blocks"
    return (
        f"not exercised: no prompt fills a {options.get('block_size')}-token KV block, so no request read the cache; "
        "use longer prompts (a system prompt and chat template) to check it"
    )


def thresholds_items(report: Report) -> list[tuple[str, str]]:
    return [(name, fmt(value, "g")) for name, value in report.thresholds.items()]


# ---------------------------------------------------------------------------------------------
# The per-module grid: a row per decoder layer, a column per module kind.


def layer_label(module: str) -> str:
    """"model.layers.3.self_attn.q_proj" → "3"; a module without a layer index keeps its parent's name."""
    index = layer_index(module)
    if index is not None:
        return str(index)
    return module.rpartition(".")[0] or module


def layer_grid(layers: list[ModuleResult]) -> tuple[list[str], list[tuple[str, dict[str, ModuleResult]]]]:
    """Module kinds in report order, and a row per layer label mapping kind → module (report order)."""
    kinds: list[str] = []
    rows: dict[str, dict[str, ModuleResult]] = {}
    for layer in layers:
        kind = module_kind(layer.module)
        if kind not in kinds:
            kinds.append(kind)
        rows.setdefault(layer_label(layer.module), {})[kind] = layer
    return kinds, list(rows.items())


def wrong_layers(phase: PhaseResult) -> list[ModuleResult]:
    return [layer for layer in phase.layers if layer.verdict != OK]


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
