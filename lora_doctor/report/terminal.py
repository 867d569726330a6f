"""The human view: a table per check, a sample per phase, the verdict and what it means."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..catalog import FAIL, OK, PASS, cause_for
from ..result import PhaseResult, Report
from .format import (
    DECODE_COLUMNS,
    PHASE_COLUMNS,
    decode_figures,
    engine_items,
    has_decode,
    layer_grid,
    modules_line,
    not_measured_lines,
    not_read_lines,
    parts_summary,
    phase_figures,
    resolution_line,
    wrong_layers,
)

VERDICT_STYLE = {OK: "bold green", PASS: "bold green", FAIL: "bold red"}


def _style(verdict: str) -> str:
    return VERDICT_STYLE.get(verdict, "bold red")


def render_terminal(report: Report, console: Console, all_modules: bool = False) -> None:
    """Print the report; `all_modules` adds every module's figures for every phase."""
    ckpt = report.checkpoint
    rslora = ", rsLoRA" if ckpt["use_rslora"] else ""
    console.print(
        f"[bold]lora-doctor[/] {report.tool['version']}  checkpoint [cyan]{ckpt['path']}[/]\n"
        f"base {ckpt['base_path']}  r={ckpt['r']} alpha={ckpt['lora_alpha']:g}{rslora} scaling={ckpt['scaling']:g}  "
        f"targets: {', '.join(ckpt['target_modules'])}\n"
        f"plan [bold]{report.plan['name']}[/]: {report.plan.get('summary', '')}"
    )
    for finding in report.preflight:
        if finding["severity"] in ("problem", "warning"):
            style = "bold red" if finding["severity"] == "problem" else "yellow"
            console.print(f"[{style}]preflight {finding['severity']}[/] {finding['code']}: {finding['message']}", highlight=False)
    if report.stopped:
        console.print(f"[bold red]check stopped:[/] {report.stopped}", highlight=False)
    else:
        console.print(_phase_table(report))
        if has_decode(report):
            console.print(_decode_table(report))
        for line in not_measured_lines(report):
            console.print(line, style="yellow", highlight=False)
    resolution = resolution_line(report.resolution)
    if resolution:
        console.print(resolution, style="dim", highlight=False)
    engine = engine_items(report)
    if engine:
        console.print("engine: " + ", ".join(f"{key}={value}" for key, value in engine), style="dim", highlight=False)
    for phase in report.phases:
        console.print(_layer_summary(phase, full=all_modules))
        for line in not_read_lines(phase):
            console.print(f"  {line}", style="yellow", highlight=False)
        if all_modules:
            console.print(_layer_detail(phase))
        for warning in phase.warnings:
            console.print(f"[yellow]phase {phase.index + 1} {phase.name}: warning:[/] {warning}", highlight=False)
    for phase in report.phases:
        console.print(_sample_panel(phase))
    console.print(_thresholds_line(report))
    for phase in report.phases:
        if not phase.ok:
            console.print(
                f"[{_style(phase.verdict)}]phase {phase.index + 1} {phase.name}: {phase.verdict}[/] — {phase.explanation}",
                highlight=False,
            )
            cause = cause_for(phase)
            if cause:
                console.print(f"  likely cause: {cause}", style="dim", highlight=False)
    console.print(Text(f"verdict: {report.verdict.upper()} (exit {report.exit_code})", style=_style(report.verdict)))


def _phase_table(report: Report) -> Table:
    table = Table(
        title="sync phases: engine vs reference (HF + PEFT, W0 + ΔW); α = effective LoRA scale",
        title_justify="left",
    )
    for column in PHASE_COLUMNS:
        table.add_column(column, justify="left" if column in ("phase", "verdict") else "right", no_wrap=True)
    for phase in report.phases:
        # An audit of a merged export has no logits: those cells read "—".
        cells = phase_figures(phase)
        cells[3] = Text(phase.verdict, style=_style(phase.verdict))
        table.add_row(*cells)
    return table


def _decode_table(report: Report) -> Table:
    table = Table(
        title="the decode path (what the rollouts see): generated tokens' log-probs, engine vs reference teacher-forced on them",
        title_justify="left",
    )
    for column in DECODE_COLUMNS:
        table.add_column(column, justify="left" if column == "phase" else "right", no_wrap=True)
    for phase in report.phases:
        table.add_row(*decode_figures(phase))
    return table


def _layer_summary(phase: PhaseResult, full: bool):
    """One line when every module is right; else a grid: a row per layer, a column per module kind."""
    title = f"phase {phase.index + 1} {phase.name}"
    if not phase.layers:
        return Text(f"{title}: per-module figures not measured", style="dim")
    wrong = wrong_layers(phase)
    line = modules_line(phase)
    if line and not full:
        return Text(f"{title}: {line}", style="green")
    kinds, rows = layer_grid(phase.layers)
    table = Table(title=f"{title}: effective LoRA scale per module ({len(wrong)}/{len(phase.layers)} wrong)", title_justify="left")
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for label, row in rows:
        cells = []
        for kind in kinds:
            layer = row.get(kind)
            cells.append(Text(_figure(layer.effective_scale, ".3f"), style=_style(layer.verdict)) if layer else Text("—", style="dim"))
        table.add_row(label, *cells)
    return Group(table, Text(f"{title}: the engine's two parts, {parts_summary(phase)} (base 1 = merged, slot 1 = adapter loaded)"))


def _layer_detail(phase: PhaseResult) -> Table:
    table = Table(title=f"phase {phase.index + 1} {phase.name}: per module", title_justify="left")
    for column in ("module", "base", "slot", "α", "residual", "divergence", "ΔW/W0", "verdict"):
        table.add_column(column, justify="left" if column in ("module", "verdict") else "right", no_wrap=True)
    for layer in phase.layers:
        table.add_row(
            layer.module,
            _figure(layer.base_part, ".4f"),
            _figure(layer.slot_part, ".4f"),
            _figure(layer.effective_scale, ".4f"),
            _figure(layer.residual, ".2e"),
            _figure(layer.divergence, ".2e"),
            _figure(layer.delta_ratio, ".1e"),
            Text(layer.verdict, style=_style(layer.verdict)),
        )
    return table


def _figure(value: float | None, spec: str) -> str:
    # None: not measured, or a NaN/Inf figure a saved JSON report holds as null (a non_finite module).
    return "—" if value is None else format(value, spec)


def _sample_panel(phase: PhaseResult) -> Panel:
    if not phase.samples:
        return Panel("no samples", title=f"phase {phase.index + 1} {phase.name}")
    sample = phase.samples[0]
    body = Group(
        Text.assemble(("prompt    ", "dim"), sample.prompt.replace("\n", "⏎")),
        Text.assemble(("reference ", "dim"), sample.reference.replace("\n", "⏎")),
        Text.assemble(("engine    ", "dim"), (sample.engine.replace("\n", "⏎"), "green" if sample.engine == sample.reference else "red")),
    )
    return Panel(body, title=f"phase {phase.index + 1} {phase.name}: sample", title_align="left")


def _thresholds_line(report: Report) -> Text:
    values = ", ".join(f"{k}={v:g}" for k, v in report.thresholds.items())
    return Text(f"thresholds: {values} (override with --threshold NAME=VALUE)", style="dim")
