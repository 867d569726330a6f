"""The shareable view: one self-contained HTML file (inline CSS, inline SVG, no external resource).

Shows what the Markdown view shows (verdict, likely cause, environment, checkpoint, plan, phase
table, per-module scales, samples, thresholds) plus the two SVG charts of `charts.py`: the
effective scale per module, and the per-token KL per phase. The stylesheet is `style.css`, beside
this module.

The report itself is embedded as JSON (`<script type="application/json" id="lora-doctor-report">`),
so the file is also machine-readable. Nothing is measured or recomputed here.
"""

from __future__ import annotations

import json
from importlib.resources import files

from ..catalog import HEALTHY, OK, cause_for
from ..result import ModuleResult, Report
from .charts import KL_LOG_RANGE, kl_chart_svg, phase_colour, prompt_colour, scale_chart_svg
from .format import (
    DECODE_COLUMNS,
    ENVIRONMENT_KEYS,
    decode_figures,
    engine_items,
    esc,
    finite_or_none,
    fmt,
    has_decode,
    has_previous,
    layer_grid,
    modules_line,
    not_measured_lines,
    not_read_lines,
    phase_columns,
    phase_figures,
    preflight_findings,
    resolution_line,
    thresholds_items,
    wrong_layers,
)

# Inlined in every page (no external resource); shipped as package data (pyproject.toml).
STYLESHEET = files(__package__).joinpath("style.css").read_text(encoding="utf-8")


def _headline(report: Report) -> str:
    """"FAIL: phase 2 adapter double_counted" / "PASS: all 2 sync phases ok" (what the verdict says)."""
    if report.stopped:
        return f"{report.verdict.upper()}: stopped before measuring — {report.stopped}"
    bad = [phase for phase in report.phases if not phase.ok]
    if not bad:
        return f"{report.verdict.upper()}: all {len(report.phases)} sync phases ok"
    parts = [f"phase {phase.index + 1} {phase.name} {phase.verdict}" for phase in bad]
    return f"{report.verdict.upper()}: " + "; ".join(parts)


def _badge(verdict: str, big: bool = False) -> str:
    kind = "good" if verdict.lower() in HEALTHY else "bad"
    size = " big" if big else ""
    return f'<span class="badge {kind}{size}">{esc(verdict)}</span>'


# ---------------------------------------------------------------------------------------------
# The page.


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document."""
    title = f"lora-doctor — {_headline(report)}"
    body = [
        _banner(report),
        _diagnosis(report),
        _preflight(report),
        _context(report),
        _phase_table(report),
        _decode_table(report),
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
        f"<title>{esc(title)}</title>\n<style>\n{STYLESHEET}</style>\n</head>\n"
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
        what = f"all {len(report.phases)} sync phases {_badge(OK)}"
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
    engine_rows = [(key, esc(value)) for key, value in engine_items(report)]
    engine_card = f'<div class="card"><h2>Engine options</h2>{_dl(engine_rows)}</div>' if engine_rows else ""
    return (
        '<section class="cards" id="context">'
        f'<div class="card"><h2>Checkpoint</h2>{_dl(ckpt_rows)}</div>'
        f'<div class="card"><h2>Plan</h2>{_dl(plan_rows)}</div>'
        f'<div class="card"><h2>Environment</h2>{_dl(env_rows)}</div>'
        f"{engine_card}"
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
                swatch = f'<span class="swatch" style="background:{phase_colour(position)}"></span>'
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


def _decode_table(report: Report) -> str:
    if not has_decode(report):
        return ""
    head = "".join(f'<th{"" if i == 1 else " class=num"}>{esc(c)}</th>' for i, c in enumerate(DECODE_COLUMNS))
    rows = []
    for phase in report.phases:
        cells = decode_figures(phase)
        out = [f"<td><code>{esc(cell)}</code></td>" if i == 1 else f"<td class=num>{esc(cell)}</td>" for i, cell in enumerate(cells)]
        rows.append(f'<tr class="{"ok" if phase.ok else "wrong"}" data-phase="{esc(phase.name)}">{"".join(out)}</tr>')
    return (
        '<section id="decode"><h2>Decode path</h2>'
        '<p class="note">What the rollouts see: the engine\'s log-probs of the tokens it generated, reading the prefix '
        "cache as the plan left it, against the reference teacher-forced on them. KL without cache: the same requests "
        "made without reading the prefix cache (measured when the decode path disagreed). Base route: a request "
        "without the adapter against W0. Cache blocks: full KV blocks of the prompts the rollout requests can read "
        "from the prefix cache.</p>"
        f'<div class="scroll"><table class="phases"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        + "".join(f'<p class="note">{esc(line)}</p>' for line in not_measured_lines(report))
        + "</section>"
    )


# ---------------------------------------------------------------------------------------------
# The charts, each with its caption and legend.


def _scale_chart_section(report: Report) -> str:
    return (
        '<section id="layer-scale"><h2>Effective LoRA scale per module</h2>'
        '<p class="note">Each module\'s weights read back from the engine, as W0 + α·ΔW. '
        "Modules in report order (layer by layer); one line per sync phase. "
        "A double count shows as a line at 2, a missing LoRA at 0.</p>"
        f'<div class="chart">{scale_chart_svg(report)}</div></section>'
    )


def _kl_section(report: Report) -> str:
    charts = []
    prompts: list[str] = []
    for phase in report.phases:
        for sample in phase.samples:
            if sample.prompt not in prompts:
                prompts.append(sample.prompt)
    # The run's measured limit; none when the logits cannot resolve the LoRA.
    kl_threshold = finite_or_none((report.resolution or {}).get("kl_limit")) if (report.resolution or {}).get("logits_resolve") else None
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
        colour = prompt_colour(i)
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


def _layer_grid_table(layers: list[ModuleResult]) -> str:
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
            cls = "num cell-ok" if layer.verdict == OK else "num cell-bad"
            tip = f"{layer.module}: {layer.verdict}, divergence {fmt(layer.divergence, '.2e')}"
            cells.append(f'<td class="{cls}" title="{esc(tip)}">{esc(fmt(layer.effective_scale, ".3f"))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _layer_detail_table(layers: list[ModuleResult]) -> str:
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
