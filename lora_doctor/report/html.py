"""The shareable view: one self-contained HTML file (inline CSS, inline SVG, no external resource).

Shows what the Markdown view shows (verdict, likely cause, environment, checkpoint, plan, phase
table, per-module scales, samples, thresholds) plus two charts drawn as SVG here in Python:

* `#layer-scale-chart`: the effective LoRA scale of every module (x, report order: layer by layer),
  one series per phase (`<g class="series" data-phase=NAME>`, a `<circle data-module data-scale>`
  per module). 1 is right, 2 is a double count, 0 is a missing LoRA.
* `#kl-chart-<phase index>`: KL(reference ‖ engine) per token along each prompt, log scale.

The report itself is embedded as JSON (`<script type="application/json" id="lora-doctor-report">`),
so the file is also machine-readable. Nothing is measured or recomputed here.
"""

from __future__ import annotations

import json
import math
from html import escape

from ..modules import module_kind
from ..result import LayerResult, PhaseResult, Report
from ..verdict import cause_for
from .grid import layer_grid, layer_label, modules_line, not_read_lines, resolution_line, wrong_layers
from .markdown import (
    ENVIRONMENT_KEYS,
    fmt,
    has_previous,
    headline,
    phase_columns,
    phase_figures,
    preflight_findings,
    thresholds_items,
)

# Okabe–Ito: distinguishable with colour-vision deficiencies.
SERIES_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#6B6B6B", "#000000")
PROMPT_COLOURS = ("#4E79A7", "#F28E2B", "#59A14F", "#B07AA1", "#E15759", "#76B7B2", "#9C755F", "#EDC948")

# The scale chart's y axis: at least [0, 2]; values far outside are drawn at the edge (hollow).
SCALE_AXIS_LIMITS = (-2.0, 5.0)
# Per-token KL spans ~1e-9 (float noise) … ~10 (a wrong policy): clip to these decades.
KL_LOG_RANGE = (-9, 1)


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def _num(value: object) -> float | None:
    """A finite float, or None (renderers draw nothing for a missing or non-finite value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _badge(verdict: str, big: bool = False) -> str:
    kind = "good" if verdict.lower() in ("ok", "pass") else "bad"
    size = " big" if big else ""
    return f'<span class="badge {kind}{size}">{esc(verdict)}</span>'


def _phase_colour(position: int) -> str:
    return SERIES_COLOURS[position % len(SERIES_COLOURS)]


def _text_width(text: str, size: float) -> float:
    """Rough rendered width of `text` at font `size` (sans-serif average glyph ≈ 0.6 em)."""
    return len(text) * size * 0.6


# ---------------------------------------------------------------------------------------------
# The page.


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document."""
    title = f"lora-doctor — {headline(report)}"
    body = [
        _banner(report),
        _diagnosis(report),
        _preflight(report),
        _context(report),
        _phase_table(report),
        _scale_chart_section(report),
        _kl_section(report),
        _layers_section(report),
        _samples_section(report),
        _thresholds_section(report),
        _footer(report),
    ]
    data = json.dumps(report.to_dict(), ensure_ascii=False).replace("<", "\\u003c")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="lora-doctor">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f'<body class="{"pass" if report.ok else "fail"}">\n<main>\n'
        + "\n".join(part for part in body if part)
        + "\n</main>\n"
        f'<script type="application/json" id="lora-doctor-report">{data}</script>\n'
        "</body>\n</html>\n"
    )


def _banner(report: Report) -> str:
    bad = [phase for phase in report.phases if not phase.ok]
    if report.stopped:
        what = "stopped before measuring"
    elif len(bad) == 1:
        what = f"phase {bad[0].index + 1} <code>{esc(bad[0].name)}</code> {_badge(bad[0].verdict)}"
    elif bad:
        verdicts = list(dict.fromkeys(p.verdict for p in bad))
        what = f"{len(bad)} of {len(report.phases)} sync phases wrong " + " ".join(_badge(v) for v in verdicts)
    else:
        what = f"all {len(report.phases)} sync phases {_badge('ok')}"
    tool = report.tool or {}
    ckpt = report.checkpoint or {}
    return (
        f'<header class="banner {"pass" if report.ok else "fail"}" id="verdict">'
        f'<div class="verdict-mark">{_badge(report.verdict.upper() if report.verdict else "?", big=True)}'
        f'<span class="exit">exit {esc(report.exit_code)}</span></div>'
        f'<div class="banner-text"><h1>{what}</h1>'
        f'<p class="sub">{esc(tool.get("name", "lora-doctor"))} {esc(tool.get("version", ""))} · '
        f'checkpoint <code>{esc(ckpt.get("path", "?"))}</code> · plan <code>{esc(report.plan.get("name", "?"))}</code></p>'
        "</div></header>"
    )


def _diagnosis(report: Report) -> str:
    if report.stopped:
        return f'<section class="diagnosis" id="diagnosis"><p>{esc(report.stopped)}: see the pre-flight findings.</p></section>'
    bad = [phase for phase in report.phases if not phase.ok]
    if not bad:
        return (
            '<section class="diagnosis good" id="diagnosis"><p>Every sync phase computes the checkpoint\'s '
            "policy (W0 + ΔW): the engine holds the right LoRA weights.</p></section>"
        )
    items = []
    for phase in bad:
        cause = cause_for(phase)
        cause_html = f'<p class="cause"><strong>Likely cause &amp; fix:</strong> {esc(cause)}</p>' if cause else ""
        items.append(
            f'<div class="finding"><div class="finding-head">phase {phase.index + 1} '
            f"<code>{esc(phase.name)}</code> {_badge(phase.verdict)}</div>"
            f'<p class="explanation">{esc(phase.explanation)}</p>{cause_html}</div>'
        )
    return f'<section class="diagnosis bad" id="diagnosis">{"".join(items)}</section>'


def _dl(rows: list[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _context(report: Report) -> str:
    ckpt = report.checkpoint or {}
    base = f'<code>{esc(ckpt.get("base_path", "—"))}</code>'
    if ckpt.get("base_model") and ckpt.get("base_model") != ckpt.get("base_path"):
        base += f' <span class="muted">(adapter_config: <code>{esc(ckpt["base_model"])}</code>)</span>'
    targets = " ".join(f'<span class="chip">{esc(t)}</span>' for t in ckpt.get("target_modules", [])) or "—"
    ckpt_rows = [
        ("path", f'<code>{esc(ckpt.get("path", "—"))}</code>'),
        ("base", base),
        ("r", esc(fmt(ckpt.get("r"), "d"))),
        ("alpha", esc(fmt(ckpt.get("lora_alpha"), "g"))),
        ("rsLoRA", esc(fmt(ckpt.get("use_rslora"), ""))),
        ("scaling", esc(fmt(ckpt.get("scaling"), "g"))),
        ("targets", targets),
    ]
    plan = report.plan or {}
    steps = " <span class=\"arrow\">→</span> ".join(f'<span class="chip">{esc(p)}</span>' for p in plan.get("phases", []))
    plan_rows = [("name", f'<code>{esc(plan.get("name", "?"))}</code>'), ("summary", esc(plan.get("summary", "")))]
    if steps:
        plan_rows.append(("phases", steps))
    env = report.environment or {}
    keys = [k for k in ENVIRONMENT_KEYS if k in env] + [k for k in env if k not in ENVIRONMENT_KEYS]
    env_rows = [(k, f"<code>{esc(env[k])}</code>") for k in keys]
    return (
        '<section class="cards" id="context">'
        f'<div class="card"><h2>Checkpoint</h2>{_dl(ckpt_rows)}</div>'
        f'<div class="card"><h2>Plan</h2>{_dl(plan_rows)}</div>'
        f'<div class="card"><h2>Environment</h2>{_dl(env_rows)}</div>'
        "</section>"
    )


def _preflight(report: Report) -> str:
    findings = preflight_findings(report)
    if not findings:
        return ""
    rows = "".join(
        f'<tr class="sev-{esc(f.get("severity", ""))}"><td><span class="sev">{esc(f.get("severity", "?"))}</span></td>'
        f'<td><code>{esc(f.get("code", "?"))}</code></td><td>{esc(f.get("message", ""))}</td>'
        f'<td class="fix">{esc(f.get("fix", ""))}</td></tr>'
        for f in findings
    )
    return (
        '<section id="preflight"><h2>Pre-flight findings</h2>'
        '<p class="note">What inspecting the checkpoint alone found (before any engine ran).</p>'
        '<div class="scroll"><table class="preflight"><thead><tr><th>severity</th><th>code</th><th>message</th>'
        f"<th>fix</th></tr></thead><tbody>{rows}</tbody></table></div></section>"
    )


def _phase_table(report: Report) -> str:
    previous = has_previous(report)
    numeric = {0, 4, 5, 6, 7, 8, 9, 10}
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{esc(c)}</th>' for i, c in enumerate(phase_columns(report)))
    rows = []
    for position, phase in enumerate(report.phases):
        cells = phase_figures(phase, previous)
        out = []
        for i, cell in enumerate(cells):
            if i == 1:
                swatch = f'<span class="swatch" style="background:{_phase_colour(position)}"></span>'
                out.append(f"<td>{swatch}<code>{esc(cell)}</code></td>")
            elif i == 3:
                out.append(f"<td>{_badge(phase.verdict)}</td>")
            else:
                out.append(f'<td{" class=num" if i in numeric else ""}>{esc(cell)}</td>')
        rows.append(f'<tr class="{"ok" if phase.ok else "wrong"}" data-phase="{esc(phase.name)}">{"".join(out)}</tr>')
    return (
        '<section id="phases"><h2>Sync phases</h2>'
        '<p class="note">Engine (vLLM after each sync step) vs reference (HF + PEFT, W0 + ΔW). '
        "α = effective LoRA scale fitted from the logits: 1 = right, 2 = double counted, 0 = missing. "
        "KL at α = what remains once α is accounted for.</p>"
        f'<div class="scroll"><table class="phases"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        "</section>"
    )


# ---------------------------------------------------------------------------------------------
# Chart: effective scale per module, one series per phase.


def _scale_chart_section(report: Report) -> str:
    return (
        '<section id="layer-scale"><h2>Effective LoRA scale per module</h2>'
        '<p class="note">Each module\'s weights read back from the engine, as W0 + α·ΔW. '
        "Modules in report order (layer by layer); one line per sync phase. "
        "A double count shows as a line at 2, a missing LoRA at 0.</p>"
        f'<div class="chart">{scale_chart_svg(report)}</div></section>'
    )


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
    entries = [(_phase_colour(pos), f"phase {phase.index + 1} {phase.name} ({phase.verdict})") for pos, phase in measured]
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

    values = [_num(layer.effective_scale) for _, phase in measured for layer in phase.layers]
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
        colour = _phase_colour(pos)
        offset = (n - (len(measured) - 1) / 2) * dodge
        runs: list[list[tuple[float, float]]] = [[]]
        circles = []
        for layer in phase.layers:
            x = x_of(index_of[layer.module]) + offset
            value = _num(layer.effective_scale)
            if value is None:
                runs.append([])
                continue
            y = y_of(value)
            runs[-1].append((x, y))
            clipped = not (y_min <= value <= y_max)
            wrong = layer.verdict != "ok"
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
# Charts: per-token KL along each prompt, one chart per phase.


def _kl_section(report: Report) -> str:
    charts = []
    prompts: list[str] = []
    for phase in report.phases:
        for sample in phase.samples:
            if sample.prompt not in prompts:
                prompts.append(sample.prompt)
    # The run's measured limit; none when the logits cannot resolve the LoRA.
    kl_threshold = _num((report.resolution or {}).get("kl_limit")) if (report.resolution or {}).get("logits_resolve") else None
    for phase in report.phases:
        charts.append(
            f'<figure class="kl-card"><figcaption>phase {phase.index + 1} <code>{esc(phase.name)}</code> '
            f'{_badge(phase.verdict)}<span class="stats">KL mean {esc(fmt(phase.kl_mean, ".2e"))} · '
            f'max {esc(fmt(phase.kl_max, ".2e"))} · at α {esc(fmt(phase.kl_at_scale, ".2e"))}</span></figcaption>'
            f"{kl_chart_svg(phase, kl_threshold)}</figure>"
        )
    longest = max((len(rows) for phase in report.phases for rows in phase.kl_per_token), default=0)
    legend_count = max((len(phase.kl_per_token) for phase in report.phases), default=0)
    legend = []
    for i in range(legend_count):
        colour = PROMPT_COLOURS[i % len(PROMPT_COLOURS)]
        # The samples are the first prompts, in order; a prompt without a sample is just numbered.
        text = prompts[i] if i < len(prompts) else ""
        shown = text.replace("\n", " ⏎ ")
        shown = shown if len(shown) <= 60 else shown[:59] + "…"
        legend.append(
            f'<li><span class="swatch" style="background:{colour}"></span>prompt {i + 1}'
            + (f': <code title="{esc(text)}">{esc(shown)}</code>' if text else "")
            + "</li>"
        )
    note = (
        "KL(reference ‖ engine) at each prompt position (the next-token distribution over the full vocabulary), log scale, clipped to "
        f"10<sup>{KL_LOG_RANGE[0]}</sup>…10<sup>{KL_LOG_RANGE[1]}</sup>"
        + (f"; dashed: this run's KL limit ({esc(fmt(kl_threshold, 'g'))})" if kl_threshold else "")
        + (f"; up to {longest} tokens per prompt" if longest else "")
        + "."
    )
    return (
        f'<section id="kl"><h2>Per-token KL</h2><p class="note">{note}</p>'
        f'<div class="kl-grid">{"".join(charts)}</div>'
        f'<ul class="prompt-legend">{"".join(legend)}</ul></section>'
    )


def _superscript(exponent: int) -> str:
    if exponent == 0:
        return "1"
    if exponent == 1:
        return "10"
    digits = str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"10{digits}"


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
        colour = PROMPT_COLOURS[n % len(PROMPT_COLOURS)]
        points = [(x_of(i), y_of(_num(v))) for i, v in enumerate(row)]
        dots = "".join(
            f'<circle class="kl-point" cx="{x:.1f}" cy="{y:.1f}" r="2.2"><title>prompt {n + 1}, token {i + 1}: '
            f"KL {esc(fmt(row[i], '.2e'))}</title></circle>"
            for i, (x, y) in enumerate(points)
        )
        line = f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>' if len(points) > 1 else ""
        parts.append(f'<g class="kl-series" data-prompt="{n}" stroke="{colour}" fill="{colour}">{line}{dots}</g>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Tables: per-module figures, samples, thresholds.


def _layers_section(report: Report) -> str:
    blocks = []
    for phase in report.phases:
        title = f"phase {phase.index + 1} <code>{esc(phase.name)}</code> {_badge(phase.verdict)}"
        if not phase.layers:
            blocks.append(f'<p class="muted">{title}: per-module figures not measured.</p>')
            continue
        wrong = wrong_layers(phase)
        count = f'<span class="muted">{len(wrong)}/{len(phase.layers)} modules wrong</span>'
        line = modules_line(phase)
        notes = [esc(text) for text in not_read_lines(phase)] + [f"warning: {esc(w)}" for w in phase.warnings]
        blocks.append(
            f'<details class="layers"{"" if not wrong else " open"}><summary>{title} {count}</summary>'
            + (f'<p class="note">{esc(line)}</p>' if line else "")
            + "".join(f'<p class="note">{note}</p>' for note in notes)
            + f"{_layer_grid_table(phase.layers)}"
            f"<details class=\"inner\"><summary>every module: base part, slot part, α, residual, divergence</summary>"
            f"{_layer_detail_table(phase.layers)}</details>"
            "</details>"
        )
    resolution = resolution_line(report.resolution)
    return (
        '<section id="modules"><h2>Per-module figures</h2>'
        '<p class="note">Effective scale α per module: a row per layer, a column per module kind '
        "(red: wrong). Base part: how much of a merged sync the engine's base weight holds (0 unmerged, 1 merged); "
        "slot part: how much ΔW its LoRA slot holds (0 none, 1 loaded).</p>"
        + (f'<p class="note">{esc(resolution)}.</p>' if resolution else "")
        + "".join(blocks) + "</section>"
    )


def _layer_grid_table(layers: list[LayerResult]) -> str:
    kinds, rows = layer_grid(layers)
    head = '<th class="num">layer</th>' + "".join(f'<th class="num">{esc(k)}</th>' for k in kinds)
    body = []
    for label, row in rows:
        cells = [f'<th class="num">{esc(label)}</th>']
        for kind in kinds:
            layer = row.get(kind)
            if layer is None:
                cells.append('<td class="num muted">—</td>')
                continue
            cls = "num cell-ok" if layer.verdict == "ok" else "num cell-bad"
            tip = f"{layer.module}: {layer.verdict}, divergence {fmt(layer.divergence, '.2e')}"
            cells.append(f'<td class="{cls}" title="{esc(tip)}">{esc(fmt(layer.effective_scale, ".3f"))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _layer_detail_table(layers: list[LayerResult]) -> str:
    rows = "".join(
        f"<tr><td><code>{esc(layer.module)}</code></td><td class=num>{esc(fmt(layer.base_part, '.4f'))}</td>"
        f"<td class=num>{esc(fmt(layer.slot_part, '.4f'))}</td><td class=num>{esc(fmt(layer.effective_scale, '.4f'))}</td>"
        f"<td class=num>{esc(fmt(layer.residual, '.2e'))}</td><td class=num>{esc(fmt(layer.divergence, '.2e'))}</td>"
        f"<td>{_badge(layer.verdict)}</td></tr>"
        for layer in layers
    )
    return (
        '<div class="scroll"><table class="detail"><thead><tr><th>module</th><th class=num>base</th><th class=num>slot</th><th class=num>α</th>'
        f"<th class=num>residual</th><th class=num>divergence</th><th>verdict</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _samples_section(report: Report) -> str:
    blocks = []
    for phase in report.phases:
        head = f"phase {phase.index + 1} <code>{esc(phase.name)}</code> {_badge(phase.verdict)}"
        if not phase.samples:
            blocks.append(f'<p class="muted">{head}: no samples.</p>')
            continue
        matches = sum(s.engine == s.reference for s in phase.samples)
        rows = []
        for number, sample in enumerate(phase.samples, 1):
            same = sample.engine == sample.reference
            mark = '<span class="match">= reference</span>' if same else '<span class="mismatch">≠ reference</span>'
            rows.append(
                f'<tr><td class="num">{number}</td><td><pre>{esc(sample.prompt)}</pre></td>'
                f"<td><pre>{esc(sample.reference)}</pre></td>"
                f'<td class="{"same" if same else "differs"}"><pre>{esc(sample.engine)}</pre>{mark}</td></tr>'
            )
        blocks.append(
            f'<details class="samples"{"" if phase.ok else " open"}><summary>{head} '
            f'<span class="muted">{matches}/{len(phase.samples)} continuations match the reference</span></summary>'
            '<div class="scroll"><table class="samples"><thead><tr><th class="num">#</th><th>prompt</th>'
            "<th>reference (HF + PEFT)</th><th>engine (vLLM)</th></tr></thead>"
            f'<tbody>{"".join(rows)}</tbody></table></div></details>'
        )
    return (
        '<section id="samples"><h2>Samples</h2><p class="note">Greedy continuations of the same prompts.</p>'
        + "".join(blocks) + "</section>"
    )


def _thresholds_section(report: Report) -> str:
    rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td class=num>{esc(v)}</td></tr>" for k, v in thresholds_items(report))
    timing = ""
    if report.seconds:
        timing_rows = "".join(
            f"<tr><td>{esc(k)}</td><td class=num>{esc(fmt(v, '.1f'))} s</td></tr>" for k, v in report.seconds.items()
        )
        timing = (
            '<div class="card"><h2>Wall time</h2><table class="kv"><tbody>'
            f"{timing_rows}</tbody></table></div>"
        )
    return (
        '<section class="cards two" id="thresholds"><div class="card"><h2>Thresholds</h2>'
        f'<table class="kv"><tbody>{rows}</tbody></table>'
        '<p class="note">Override with <code>--threshold NAME=VALUE</code>.</p></div>'
        f"{timing}</section>"
    )


def _footer(report: Report) -> str:
    tool = report.tool or {}
    return (
        f'<footer>{esc(tool.get("name", "lora-doctor"))} {esc(tool.get("version", ""))} · report schema '
        f"{esc(report.schema_version)} · the full report is embedded as JSON "
        '(<code>script#lora-doctor-report</code>).</footer>'
    )


CSS = """
:root{--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--soft:#f6f8fa;--good:#1a7f37;--good-bg:#dafbe1;
--bad:#b42318;--bad-bg:#ffebe9;--accent:#0969da;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans","DejaVu Sans",sans-serif;
font-size:15px;line-height:1.45;color:var(--fg);background:#fff}
*{box-sizing:border-box}
body{margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 40px}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono","DejaVu Sans Mono",monospace;font-size:.88em}
code{background:var(--soft);border-radius:4px;padding:.05em .35em}
h1{font-size:1.45rem;margin:0 0 4px;font-weight:600;line-height:1.3}
h2{font-size:1.1rem;margin:0 0 8px;font-weight:600}
section{margin:22px 0}
.note{color:var(--muted);margin:0 0 10px;font-size:.92rem}
.muted{color:var(--muted);font-size:.9em;margin-left:.5em}
.banner{display:flex;gap:20px;align-items:center;padding:18px 22px;border-radius:10px;border:1px solid}
.banner.fail{background:var(--bad-bg);border-color:#ffc1ba}
.banner.pass{background:var(--good-bg);border-color:#aceebb}
.banner .sub{margin:0;color:var(--muted);font-size:.92rem;word-break:break-all}
.verdict-mark{display:flex;flex-direction:column;align-items:center;gap:4px}
.verdict-mark .exit{font-size:.8rem;color:var(--muted)}
.badge{display:inline-block;padding:.1em .55em;border-radius:999px;font-size:.82em;font-weight:600;
letter-spacing:.01em;vertical-align:.08em;border:1px solid;white-space:nowrap}
.badge.good{color:var(--good);background:var(--good-bg);border-color:#aceebb}
.badge.bad{color:#fff;background:var(--bad);border-color:var(--bad)}
.badge.big{font-size:1.35rem;padding:.25em .9em;letter-spacing:.06em}
.badge.good.big{color:#fff;background:var(--good);border-color:var(--good)}
.diagnosis .finding{border-left:4px solid var(--bad);background:#fff8f7;padding:12px 16px;border-radius:0 8px 8px 0;margin-bottom:10px}
.diagnosis.good p{border-left:4px solid var(--good);background:#f3fcf5;padding:12px 16px;border-radius:0 8px 8px 0;margin:0}
.finding-head{font-weight:600;margin-bottom:4px}
.finding p{margin:4px 0}
.cause{color:#3d444d}
.cards{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:14px}
.cards.two{grid-template-columns:repeat(2,minmax(0,1fr))}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 16px;background:#fff}
.card h2{font-size:.95rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:4px 12px;margin:0;font-size:.92rem}
dt{color:var(--muted)}
dd{margin:0;overflow-wrap:anywhere}
.chip{display:inline-block;background:var(--soft);border:1px solid var(--line);border-radius:4px;padding:0 .4em;
margin:0 2px 3px 0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.8rem}
.arrow{color:var(--muted)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.92rem}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--soft);font-weight:600;border-bottom:2px solid var(--line);white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums}
table.phases{width:100%}
table.phases td{white-space:nowrap}
table.phases tr.wrong td{background:#fffafa}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:0}
.chart{border:1px solid var(--line);border-radius:8px;padding:10px 12px 4px;background:#fff}
svg text{fill:#3d444d;font-size:11px}
svg .tick{fill:var(--muted)}
svg .axis-title{font-size:12px;fill:var(--muted)}
svg .axis{stroke:#8c959f;stroke-width:1}
svg .grid{stroke:#e6e9ed;stroke-width:1}
svg .grid.minor{stroke:#f2f4f6}
svg .zebra{fill:#f6f8fa}
svg .ref-zero{stroke:#8c959f;stroke-width:1;stroke-dasharray:4 3}
svg .ref-one{stroke:var(--good);stroke-width:1.4;stroke-dasharray:6 3}
svg .ref-two{stroke:var(--bad);stroke-width:1.4;stroke-dasharray:6 3}
svg .ref-label{font-size:11.5px;font-weight:600}
svg .ref-zero-label{fill:var(--muted)}
svg .ref-one-label{fill:var(--good)}
svg .ref-two-label{fill:var(--bad)}
svg .kind{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:10.5px;fill:#57606a}
svg .layer{font-size:12px;font-weight:600;fill:#3d444d}
svg .bracket{fill:none;stroke:#afb8c1;stroke-width:1}
svg .legend text{font-size:12px;fill:var(--fg)}
svg .legend-note{font-size:12px;fill:var(--muted)}
svg .empty{fill:var(--muted);font-size:14px}
svg .series polyline{fill:none;stroke-width:2.2;stroke-linejoin:round}
svg .series circle{stroke:#fff;stroke-width:1.2}
svg .series circle.wrong{stroke:#fff;stroke-width:1.5}
svg .series circle.clipped{fill:#fff;stroke:var(--c);stroke-width:2}
svg .plot-bg{fill:#fff}
svg .threshold{stroke:#bf8700;stroke-width:1.2;stroke-dasharray:5 3}
svg .kl-series polyline{fill:none;stroke-width:1.6;stroke-linejoin:round;opacity:.9}
svg .kl-series circle{stroke:none}
.kl-grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
.kl-card{margin:0;border:1px solid var(--line);border-radius:8px;padding:10px 12px 4px}
.kl-card figcaption{font-weight:600;margin-bottom:4px}
.kl-card .stats{display:block;font-weight:400;color:var(--muted);font-size:.85rem;font-variant-numeric:tabular-nums}
.prompt-legend{list-style:none;padding:0;margin:8px 0 0;display:flex;flex-wrap:wrap;gap:4px 18px;font-size:.88rem}
details{border:1px solid var(--line);border-radius:8px;margin:0 0 10px;background:#fff}
details>summary{cursor:pointer;padding:9px 14px;font-weight:600}
details[open]>summary{border-bottom:1px solid var(--line)}
details>:not(summary){margin:10px 14px}
details.inner{margin:10px 14px 12px}
details.inner>summary{font-weight:500;color:var(--muted);font-size:.9rem}
table.grid td,table.grid th{padding:5px 12px}
td.cell-ok{background:#f3fcf5;color:var(--good)}
td.cell-bad{background:var(--bad-bg);color:var(--bad);font-weight:600}
table.samples{width:100%;table-layout:fixed}
table.samples th:first-child,table.samples td:first-child{width:36px}
table.samples pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;background:var(--soft);border-radius:4px;padding:6px 8px}
table.samples td.differs pre{background:var(--bad-bg)}
table.samples td.same pre{background:#f3fcf5}
.match,.mismatch{display:block;font-size:.78rem;margin-top:3px}
.match{color:var(--good)}
.mismatch{color:var(--bad);font-weight:600}
table.preflight{width:100%}
table.preflight .sev{font-weight:600;font-size:.85em;text-transform:uppercase;letter-spacing:.04em}
tr.sev-problem .sev{color:var(--bad)}
tr.sev-warning .sev{color:#9a6700}
tr.sev-info .sev{color:var(--muted)}
table.preflight td.fix{color:#3d444d}
table.kv{width:100%}
table.kv td{padding:4px 10px}
footer{color:var(--muted);font-size:.82rem;border-top:1px solid var(--line);padding-top:10px;margin-top:28px}
@media (max-width:900px){.cards{grid-template-columns:1fr}.cards.two{grid-template-columns:1fr}}
@media print{details{break-inside:avoid}.banner{break-inside:avoid}}
"""
