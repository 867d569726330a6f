"""The HTML page's charts, drawn as inline SVG in Python (no script, no external resource).

* `#layer-scale-chart`: the effective LoRA scale of every module (x, report order: layer by layer),
  one series per phase (`<g class="series" data-phase=NAME>`, a `<circle data-module data-scale>`
  per module). 1 is right, 2 is a double count, 0 is a missing LoRA.
* `#kl-chart-<phase index>`: KL(reference ‖ engine) per token along each prompt, log scale.
"""

from __future__ import annotations

import math

from ..adapter.modules import module_kind
from ..catalog import OK
from ..result import PhaseResult, Report
from .format import esc, finite_or_none, fmt, layer_label

# Okabe–Ito: distinguishable with colour-vision deficiencies.
SERIES_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#6B6B6B", "#000000")
PROMPT_COLOURS = ("#4E79A7", "#F28E2B", "#59A14F", "#B07AA1", "#E15759", "#76B7B2", "#9C755F", "#EDC948")

# The scale chart's y axis: at least [0, 2]; values far outside are drawn at the edge (hollow).
SCALE_AXIS_LIMITS = (-2.0, 5.0)
# Per-token KL spans ~1e-9 (float noise) … ~10 (a wrong policy): clip to these decades.
KL_LOG_RANGE = (-9, 1)


def phase_colour(position: int) -> str:
    """The colour of the phase at `position` in the report, the same in the phase table and the scale chart."""
    return SERIES_COLOURS[position % len(SERIES_COLOURS)]


def prompt_colour(number: int) -> str:
    """The colour of prompt `number` (0-based), the same in every KL chart and the prompt legend."""
    return PROMPT_COLOURS[number % len(PROMPT_COLOURS)]


def _text_width(text: str, size: float) -> float:
    """Rough rendered width of `text` at font `size` (sans-serif average glyph ≈ 0.6 em)."""
    return len(text) * size * 0.6


# ---------------------------------------------------------------------------------------------
# Effective scale per module, one series per phase.


def scale_chart_svg(report: Report) -> str:
    """The `#layer-scale-chart` SVG (modules on x, scale on y, a series per phase)."""
    measured = [(pos, phase) for pos, phase in enumerate(report.phases) if phase.layers]
    # The x axis: modules in the order of the first phase that measured them, then any others.
    modules: list[str] = []
    seen: set[str] = set()
    for _, phase in measured:
        for layer in phase.layers:
            if layer.module not in seen:
                seen.add(layer.module)
                modules.append(layer.module)

    width, height = 1000, 380
    left, right, top, bottom = 60, 132, 44, 74
    # Legend along the top: one entry per measured phase, wrapped into rows that fit the width.
    legend: list[tuple[float, float, str, str]] = []
    legend_x, legend_row = float(left), 0
    entries = [(phase_colour(pos), f"phase {phase.index + 1} {phase.name} ({phase.verdict})") for pos, phase in measured]
    unmeasured = [phase.name for phase in report.phases if not phase.layers]
    if unmeasured:
        entries.append(("", "not measured: " + ", ".join(unmeasured)))
    for colour, text in entries:
        item = (28 if colour else 0) + _text_width(text, 12) + 24
        if legend_x > left and legend_x + item > width - 10:
            legend_x, legend_row = float(left), legend_row + 1
        legend.append((legend_x, 16 + 20 * legend_row, colour, text))
        legend_x += item
    top += 20 * legend_row
    height += 20 * legend_row
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg id="layer-scale-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="effective LoRA scale per module, one series per phase" '
        f'class="scale-chart" font-family="inherit">'
    ]
    if not modules:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">'
            "per-module figures were not measured</text></svg>"
        )
        return "".join(parts)

    values = [finite_or_none(layer.effective_scale) for _, phase in measured for layer in phase.layers]
    finite = [v for v in values if v is not None]
    # Whole units around [0, 2]; a value a hair above 2 (float noise) does not open a new unit.
    lo = max(math.floor(min([0.0, *finite]) + 0.1), SCALE_AXIS_LIMITS[0])
    hi = min(math.ceil(max([2.0, *finite]) - 0.1), SCALE_AXIS_LIMITS[1])
    y_min, y_max = lo - 0.25, hi + 0.25

    def y_of(value: float) -> float:
        value = min(max(value, y_min), y_max)
        return top + (y_max - value) / (y_max - y_min) * plot_h

    band = plot_w / len(modules)

    def x_of(index: int) -> float:
        return left + (index + 0.5) * band

    # Layer groups: zebra bands and a label under each group.
    groups: list[tuple[str, int, int]] = []
    for i, module in enumerate(modules):
        label = layer_label(module)
        if groups and groups[-1][0] == label:
            groups[-1] = (label, groups[-1][1], i)
        else:
            groups.append((label, i, i))
    for n, (label, first, last) in enumerate(groups):
        if n % 2:
            parts.append(
                f'<rect class="zebra" x="{left + first * band:.1f}" y="{top}" width="{(last - first + 1) * band:.1f}" '
                f'height="{plot_h}"/>'
            )

    # Gridlines: every integer in range, with 0, 1, 2 named.
    reference = {0: ("missing (W0)", "ref-zero"), 1: ("right (W0 + ΔW)", "ref-one"), 2: ("double counted", "ref-two")}
    for tick in range(int(lo), int(hi) + 1):
        y = y_of(tick)
        cls = reference.get(tick, (None, "grid"))[1]
        parts.append(f'<line class="{cls}" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
        if tick in reference:
            parts.append(
                f'<text class="ref-label {cls}-label" x="{left + plot_w + 8}" y="{y + 4:.1f}">{esc(reference[tick][0])}</text>'
            )
    parts.append(
        f'<text class="axis-title" transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">effective scale α</text>'
    )
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}"/>')

    # x labels: module kinds (shortened, rotated if they do not fit, dropped if too dense), then layers.
    kinds = [module_kind(m) for m in modules]
    short = [k[: -len("_proj")] if k.endswith("_proj") and len(k) > len("_proj") else k for k in kinds]
    size = 11
    widest = max(_text_width(s, size) for s in short)
    kind_y = top + plot_h + 16
    if band >= widest + 4:
        for i, label in enumerate(short):
            parts.append(
                f'<text class="kind" x="{x_of(i):.1f}" y="{kind_y}" text-anchor="middle"><title>{esc(modules[i])}</title>{esc(label)}</text>'
            )
        layer_y = kind_y + 26
    elif band >= size + 1:
        for i, label in enumerate(short):
            parts.append(
                f'<text class="kind" x="{x_of(i):.1f}" y="{kind_y - 4}" text-anchor="end" '
                f'transform="rotate(-45 {x_of(i):.1f} {kind_y - 4})"><title>{esc(modules[i])}</title>{esc(label)}</text>'
            )
        layer_y = kind_y + min(widest * 0.71, 40) + 12
    else:
        layer_y = kind_y + 4
    # Layer labels: "layer N" when it fits, else "N"; thinned so no two overlap.
    words = all(_text_width(f"layer {g[0]}", size) + 6 <= (g[2] - g[1] + 1) * band for g in groups)
    last_end = -math.inf
    for label, first, last in groups:
        text = f"layer {label}" if words else label
        centre = left + (first + last + 1) / 2 * band
        half = _text_width(text, size) / 2
        if centre - half < last_end + 6:
            continue
        last_end = centre + half
        parts.append(f'<text class="layer" x="{centre:.1f}" y="{layer_y:.1f}" text-anchor="middle">{esc(text)}</text>')
        if (last - first) >= 1 and band * (last - first + 1) > 24:
            y = layer_y - 14
            parts.append(
                f'<path class="bracket" d="M{left + first * band + 3:.1f} {y - 4:.1f} V{y:.1f} '
                f'H{left + (last + 1) * band - 3:.1f} V{y - 4:.1f}"/>'
            )
    # Fit the viewBox to the labels actually drawn (rotated labels need more room).
    parts[0] = parts[0].replace(f"0 0 {width} {height}", f"0 0 {width} {layer_y + 8:.0f}")

    # Series: a polyline and a circle per module, dodged sideways so coincident points stay visible.
    index_of = {m: i for i, m in enumerate(modules)}
    dodge = min(5.0, band * 0.12)
    radius = max(1.2, min(3.5, band * 0.3))
    for n, (pos, phase) in enumerate(measured):
        colour = phase_colour(pos)
        offset = (n - (len(measured) - 1) / 2) * dodge
        runs: list[list[tuple[float, float]]] = [[]]
        circles = []
        for layer in phase.layers:
            x = x_of(index_of[layer.module]) + offset
            value = finite_or_none(layer.effective_scale)
            if value is None:
                runs.append([])
                continue
            y = y_of(value)
            runs[-1].append((x, y))
            clipped = not (y_min <= value <= y_max)
            wrong = layer.verdict != OK
            cls = "point" + (" wrong" if wrong else "") + (" clipped" if clipped else "")
            tip = (
                f"phase {phase.index + 1} {phase.name} · {layer.module}\nα = {fmt(layer.effective_scale, '.4f')} · "
                f"divergence {fmt(layer.divergence, '.2e')} · {layer.verdict}"
            )
            circles.append(
                f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="{radius * (1.3 if wrong else 1):.1f}" '
                f'data-module="{esc(layer.module)}" data-scale="{esc(repr(float(layer.effective_scale)) if value is not None else "")}" '
                f'data-verdict="{esc(layer.verdict)}"><title>{esc(tip)}</title></circle>'
            )
        lines = "".join(
            f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in run)}"/>' for run in runs if len(run) > 1
        )
        parts.append(
            f'<g class="series" data-phase="{esc(phase.name)}" data-index="{phase.index}" '
            f'style="--c:{colour}" stroke="{colour}" fill="{colour}">{lines}{"".join(circles)}</g>'
        )
    for x, y, colour, text in legend:
        if colour:
            parts.append(
                f'<g class="legend" transform="translate({x:.1f} {y})">'
                f'<line x1="0" x2="22" y1="0" y2="0" stroke="{colour}" stroke-width="2.5"/>'
                f'<circle cx="11" cy="0" r="4" fill="{colour}"/>'
                f'<text x="28" y="4">{esc(text)}</text></g>'
            )
        else:
            parts.append(f'<text class="legend-note" x="{x:.1f}" y="{y + 4}">{esc(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)



# ---------------------------------------------------------------------------------------------
# Per-token KL along each prompt, one chart per phase.


def kl_chart_svg(phase: PhaseResult, threshold: float | None = None) -> str:
    """The `#kl-chart-<index>` SVG: per-token KL per prompt on a clipped log scale."""
    width, height = 480, 230
    left, right, top, bottom = 50, 14, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    low, high = KL_LOG_RANGE
    parts = [
        f'<svg id="kl-chart-{phase.index}" class="kl-chart" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="100%" role="img" font-family="inherit" '
        f'aria-label="per-token KL, phase {phase.index + 1} {esc(phase.name)}" data-phase="{esc(phase.name)}">'
    ]
    rows = [row for row in phase.kl_per_token if row]
    if not rows:
        parts.append(
            f'<rect class="plot-bg" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>'
            f'<text class="empty" x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle">'
            "per-token KL not recorded</text></svg>"
        )
        return "".join(parts)
    longest = max(len(row) for row in rows)

    def y_of(value: float | None) -> float:
        exponent = low if value is None or value <= 0 else min(max(math.log10(value), low), high)
        return top + (high - exponent) / (high - low) * plot_h

    def x_of(position: int) -> float:
        return left + (position / (longest - 1) if longest > 1 else 0.5) * plot_w

    parts.append(f'<rect class="plot-bg" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>')
    for exponent in range(low, high + 1):
        y = top + (high - exponent) / (high - low) * plot_h
        major = exponent % 3 == 0
        parts.append(f'<line class="{"grid" if major else "grid minor"}" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        if major:
            parts.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_superscript(exponent)}</text>')
    if threshold is not None and threshold > 0:
        y = y_of(threshold)
        parts.append(f'<line class="threshold" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}">'
                     f"<title>KL limit {esc(fmt(threshold, 'g'))}</title></line>")
    step = max(1, math.ceil(longest / 8))
    for position in range(0, longest, step):
        parts.append(
            f'<text class="tick" x="{x_of(position):.1f}" y="{top + plot_h + 15}" text-anchor="middle">{position + 1}</text>'
        )
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">prompt position</text>'
    )
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    for n, row in enumerate(phase.kl_per_token):
        if not row:
            continue
        colour = prompt_colour(n)
        points = [(x_of(i), y_of(finite_or_none(v))) for i, v in enumerate(row)]
        dots = "".join(
            f'<circle class="kl-point" cx="{x:.1f}" cy="{y:.1f}" r="2.2"><title>prompt {n + 1}, token {i + 1}: '
            f"KL {esc(fmt(row[i], '.2e'))}</title></circle>"
            for i, (x, y) in enumerate(points)
        )
        line = f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>' if len(points) > 1 else ""
        parts.append(f'<g class="kl-series" data-prompt="{n}" stroke="{colour}" fill="{colour}">{line}{dots}</g>')
    parts.append("</svg>")
    return "".join(parts)


def _superscript(exponent: int) -> str:
    if exponent == 0:
        return "1"
    if exponent == 1:
        return "10"
    digits = str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"10{digits}"
