"""The issue view: one Markdown section to paste into a GitHub issue.

Renders the report as it is (no measurement is recomputed): the overall verdict as the heading,
what went wrong and the likely fix, the environment, checkpoint and plan, a row per sync phase,
the per-module scales of unhealthy phases, the samples (in code fences, so `<think>` tags survive)
and the thresholds. Long detail sits in `<details>` blocks so the issue stays readable.
"""

from __future__ import annotations

import re

from ..catalog import HEALTHY, OK, cause_for
from ..result import PhaseResult, Report
from .format import (
    DECODE_COLUMNS,
    ENVIRONMENT_KEYS,
    decode_figures,
    engine_items,
    esc,
    fmt,
    has_decode,
    has_previous,
    layer_grid,
    modules_line,
    not_measured_lines,
    not_read_lines,
    parts_summary,
    phase_columns,
    phase_figures,
    preflight_findings,
    resolution_line,
    thresholds_items,
    wrong_layers,
)

# ---------------------------------------------------------------------------------------------
# Markdown escaping.

# What GFM could read as markup inside a line: code, emphasis, links, raw HTML, table cells, strike.
_INLINE_SPECIALS = re.compile(r"([\\`*_\[\]<>|~])")


def md_text(text: object) -> str:
    """Plain text safe in Markdown prose and table cells (no HTML, no emphasis, no cell break)."""
    escaped = _INLINE_SPECIALS.sub(r"\\\1", str(text))
    return escaped.replace("\r\n", " ").replace("\n", " ⏎ ").replace("\r", " ")


def md_code(text: object, cell: bool = False) -> str:
    """Inline code that survives any backticks inside (and, in a table `cell`, pipes)."""
    value = str(text).replace("\n", "⏎")
    if cell:
        value = value.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def md_block(text: str, info: str = "text") -> str:
    """A fenced code block whose fence is longer than any backtick run in `text`."""
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{fence}{info}\n{body}{fence}"


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _details(summary: str, body: list[str], open_: bool = False) -> list[str]:
    # GitHub renders Markdown inside <details> only with a blank line after </summary>.
    return [f"<details{' open' if open_ else ''}><summary>{summary}</summary>", "", *body, "", "</details>"]


def _verdict_mark(verdict: str) -> str:
    if verdict in HEALTHY:
        return f"✅ {verdict}"
    return f"❌ **{verdict}**"


# ---------------------------------------------------------------------------------------------
# The section.


def render_markdown(report: Report) -> str:
    """The report as one Markdown section for a GitHub issue (GitHub-flavoured Markdown)."""
    out: list[str] = []
    out += _heading(report)
    out += ["", *_diagnosis(report)]
    out += ["", *_preflight_section(report)] if preflight_findings(report) else []
    out += ["", *_context(report)]
    out += ["", *_phase_section(report)] if report.phases else []
    for phase in report.phases:
        out += ["", *_layer_section(phase)]
    out += ["", *_samples_section(report)]
    out += ["", *_thresholds_section(report)]
    return "\n".join(out).rstrip() + "\n"


def _heading(report: Report) -> list[str]:
    mark = "✅" if report.ok else "❌"
    bad = [phase for phase in report.phases if not phase.ok]
    if report.stopped:
        what = "stopped before measuring"
    elif bad:
        what = "; ".join(f"phase {p.index + 1} {md_code(p.name)}: `{p.verdict}`" for p in bad)
    else:
        what = f"all {len(report.phases)} sync phases `ok`"
    tool = report.tool or {}
    version = " ".join(str(tool[k]) for k in ("name", "version") if tool.get(k)) or "lora-doctor"
    return [
        f"### {mark} lora-doctor: {report.verdict.upper()} — {what}",
        "",
        f"{md_code(version)} · verdict **{md_text(report.verdict)}** (exit {report.exit_code})"
        f" · plan {md_code(report.plan.get('name', '?'))}",
    ]


def _diagnosis(report: Report) -> list[str]:
    if report.stopped:
        return [f"**Verdict:** {md_text(report.stopped)}: see the pre-flight findings."]
    bad = [phase for phase in report.phases if not phase.ok]
    if not bad:
        return ["**Verdict:** every sync phase computes the checkpoint's policy (W0 + ΔW)."]
    lines = ["**Verdict:**", ""]
    for phase in bad:
        lines.append(
            f"- **phase {phase.index + 1} {md_code(phase.name)}: `{phase.verdict}`** — {md_text(phase.explanation)}"
        )
        cause = cause_for(phase)
        if cause:
            lines.append(f"  - *likely cause:* {md_text(cause)}")
    return lines


def _context(report: Report) -> list[str]:
    env = report.environment or {}
    keys = [k for k in ENVIRONMENT_KEYS if k in env] + [k for k in env if k not in ENVIRONMENT_KEYS]
    env_line = " · ".join(f"{k} {md_code(env[k])}" for k in keys) or "—"

    ckpt = report.checkpoint or {}
    targets = ", ".join(md_code(t, cell=True) for t in ckpt.get("target_modules", [])) or "—"
    base = md_code(ckpt.get("base_path", "—"), cell=True)
    if ckpt.get("base_model") and ckpt.get("base_model") != ckpt.get("base_path"):
        base += f" (adapter_config: {md_code(ckpt['base_model'], cell=True)})"
    ckpt_rows = [
        ["path", md_code(ckpt.get("path", "—"), cell=True)],
        ["base", base],
        ["r", fmt(ckpt.get("r"), "d")],
        ["alpha", fmt(ckpt.get("lora_alpha"), "g")],
        ["rsLoRA", fmt(ckpt.get("use_rslora"), "")],
        ["scaling", fmt(ckpt.get("scaling"), "g")],
        ["targets", targets],
    ]

    plan = report.plan or {}
    plan_phases = " → ".join(md_code(p) for p in plan.get("phases", []))
    lines = [f"**Environment:** {env_line}", "", "**Checkpoint:**", ""]
    lines += _table(["field", "value"], ckpt_rows, ["l", "l"])
    lines += ["", f"**Plan:** {md_code(plan.get('name', '?'))} — {md_text(plan.get('summary', ''))}"]
    if plan_phases:
        lines[-1] += f" (phases: {plan_phases})"
    engine = engine_items(report)
    if engine:
        lines += ["", "**Engine options:** " + " · ".join(f"{md_code(key)} {md_text(value)}" for key, value in engine)]
    return lines


def _preflight_section(report: Report) -> list[str]:
    findings = preflight_findings(report)
    shown = [f for f in findings if f.get("severity") in ("problem", "warning")]
    rest = [f for f in findings if f not in shown]
    lines = ["**Pre-flight findings** (checkpoint inspection):", ""]

    def item(finding: dict) -> list[str]:
        out = [f"- **{md_text(finding.get('severity', '?'))}** {md_code(finding.get('code', '?'))}: "
               f"{md_text(finding.get('message', ''))}"]
        if finding.get("fix"):
            out.append(f"  - *fix:* {md_text(finding['fix'])}")
        return out

    for finding in shown:
        lines += item(finding)
    if rest:
        body = [line for finding in rest for line in item(finding)]
        lines += ["", *_details(f"{len(rest)} informational finding{'s' if len(rest) != 1 else ''}", body)]
    return lines


def _phase_section(report: Report) -> list[str]:
    previous = has_previous(report)
    rows = []
    for phase in report.phases:
        cells = phase_figures(phase, previous)
        cells[1] = md_code(cells[1], cell=True)
        cells[3] = _verdict_mark(phase.verdict)
        rows.append(cells)
    align = ["r", "l", "l", "l", "r", "r", "r", "r", "r", "r"] + (["r"] if previous else [])
    resolution = resolution_line(report.resolution)
    return [
        "**Sync phases** — engine vs reference (HF + PEFT, W0 + ΔW); α = effective LoRA scale "
        "(1 = right, 2 = double counted, 0 = missing):",
        "",
        *_table(phase_columns(report), rows, align),
        *(["", f"*{md_text(resolution)}.*"] if resolution else []),
        *_decode_section(report),
    ]


def _decode_section(report: Report) -> list[str]:
    if not has_decode(report):
        return []
    rows = []
    for phase in report.phases:
        cells = decode_figures(phase)
        cells[1] = md_code(cells[1], cell=True)
        rows.append(cells)
    return [
        "",
        "**Decode path** — what the rollouts see: the engine's log-probs of the tokens it generated (reading the prefix "
        "cache as the plan left it) against the reference teacher-forced on them; KL without cache: the same requests "
        "made without reading the prefix cache; cache blocks: full KV blocks of the prompts the rollout requests can read "
        "from the prefix cache; base route: a request without the adapter against W0:",
        "",
        *_table(list(DECODE_COLUMNS), rows, ["r", "l"] + ["r"] * (len(DECODE_COLUMNS) - 2)),
        *(["", *[f"- *{md_text(line)}*" for line in not_measured_lines(report)]] if not_measured_lines(report) else []),
    ]


def _layer_section(phase: PhaseResult) -> list[str]:
    title = f"phase {phase.index + 1} {md_code(phase.name)}"
    if not phase.layers:
        return [f"*{title}: per-module figures not measured.*"]
    wrong = wrong_layers(phase)
    extra = [f"- {md_text(line)}" for line in not_read_lines(phase)] + [f"- *warning:* {md_text(w)}" for w in phase.warnings]
    line = modules_line(phase)
    if line:
        return [f"*{title}: {md_text(line)}.*"] + (["", *extra] if extra else [])

    kinds, rows = layer_grid(phase.layers)
    grid = []
    for label, row in rows:
        cells = [label]
        for kind in kinds:
            layer = row.get(kind)
            if layer is None:
                cells.append("—")
            elif layer.verdict == OK:
                cells.append(fmt(layer.effective_scale, ".3f"))
            else:
                cells.append(f"**{fmt(layer.effective_scale, '.3f')}**")
        grid.append(cells)
    body = [f"Effective LoRA scale per module (**bold** = wrong; {len(wrong)}/{len(phase.layers)} wrong; {parts_summary(phase)}):", ""]
    body += _table(["layer", *kinds], grid, ["r"] * (len(kinds) + 1))
    detail = [
        [md_code(layer.module, cell=True), fmt(layer.base_part, ".4f"), fmt(layer.slot_part, ".4f"),
         fmt(layer.effective_scale, ".4f"), fmt(layer.residual, ".2e"), fmt(layer.divergence, ".2e"), md_text(layer.verdict)]
        for layer in phase.layers
    ]
    body += ["", *_details("every module: base part, slot part, α, residual, divergence",
                           _table(["module", "base", "slot", "α", "residual", "divergence", "verdict"], detail,
                                  ["l", "r", "r", "r", "r", "r", "l"]))]
    body += ["", *extra] if extra else []
    summary = f"Per-module scale — phase {phase.index + 1} <code>{esc(phase.name)}</code>: " \
              f"{len(wrong)}/{len(phase.layers)} modules wrong"
    return _details(summary, body, open_=True)


def _samples_section(report: Report) -> list[str]:
    lines = ["**Samples** (greedy continuations; reference = HF + PEFT, engine = vLLM after the sync):"]
    for phase in report.phases:
        if not phase.samples:
            lines += ["", f"*phase {phase.index + 1} {md_code(phase.name)}: no samples.*"]
            continue
        body: list[str] = []
        for number, sample in enumerate(phase.samples, 1):
            same = "engine = reference" if sample.engine == sample.reference else "engine ≠ reference"
            body += [
                f"**sample {number}** ({same})",
                "",
                "prompt:",
                md_block(sample.prompt),
                "reference:",
                md_block(sample.reference),
                "engine:",
                md_block(sample.engine),
            ]
            if number < len(phase.samples):
                body.append("")
        matches = sum(sample.engine == sample.reference for sample in phase.samples)
        summary = (
            f"phase {phase.index + 1} <code>{esc(phase.name)}</code> ({esc(phase.verdict)}): "
            f"{matches}/{len(phase.samples)} samples match the reference"
        )
        lines += ["", *_details(summary, body, open_=not phase.ok)]
    return lines


def _thresholds_section(report: Report) -> list[str]:
    rows = [[md_code(name, cell=True), value] for name, value in thresholds_items(report)]
    body = _table(["threshold", "value"], rows, ["l", "r"])
    body += ["", "Override with `--threshold NAME=VALUE`."]
    if report.seconds:
        timing = " · ".join(f"{md_text(k)} {fmt(v, '.1f')} s" for k, v in report.seconds.items())
        body += ["", f"Wall time: {timing}."]
    return _details("Thresholds", body)
