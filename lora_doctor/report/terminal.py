"""The human view: a table per check, a sample per phase, the verdict and what it means."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..result import PhaseResult, Report

VERDICT_STYLE = {"ok": "bold green", "pass": "bold green", "fail": "bold red"}


def _style(verdict: str) -> str:
    return VERDICT_STYLE.get(verdict, "bold red")


def render_terminal(report: Report, console: Console) -> None:
    ckpt = report.checkpoint
    rslora = ", rsLoRA" if ckpt["use_rslora"] else ""
    console.print(
        f"[bold]lora-doctor[/] {report.tool['version']}  checkpoint [cyan]{ckpt['path']}[/]\n"
        f"base {ckpt['base_path']}  r={ckpt['r']} alpha={ckpt['lora_alpha']:g}{rslora} scaling={ckpt['scaling']:g}  "
        f"targets: {', '.join(ckpt['target_modules'])}\n"
        f"plan [bold]{report.plan['name']}[/]: {report.plan.get('summary', '')}"
    )
    console.print(_phase_table(report))
    for phase in report.phases:
        console.print(_sample_panel(phase))
    console.print(_thresholds_line(report))
    for phase in report.phases:
        if not phase.ok:
            console.print(f"[{_style(phase.verdict)}]phase {phase.index + 1} {phase.name}: {phase.verdict}[/] — {phase.explanation}")
    console.print(Text(f"verdict: {report.verdict.upper()} (exit {report.exit_code})", style=_style(report.verdict)))


def _phase_table(report: Report) -> Table:
    table = Table(
        title="sync phases: engine vs reference (HF + PEFT, W0 + ΔW); α = effective LoRA scale",
        title_justify="left",
    )
    for column in ("#", "phase", "adapter", "verdict", "α", "KL mean", "KL max", "KL at α", "top-1", "greedy"):
        table.add_column(column, justify="left" if column in ("phase", "verdict") else "right", no_wrap=True)
    for phase in report.phases:
        table.add_row(
            str(phase.index + 1),
            phase.name,
            "yes" if phase.with_adapter else "no",
            Text(phase.verdict, style=_style(phase.verdict)),
            f"{phase.effective_scale:.3f}",
            f"{phase.kl_mean:.2e}",
            f"{phase.kl_max:.2e}",
            f"{phase.kl_at_scale:.2e}",
            f"{phase.top1_agreement:.1%}",
            f"{phase.greedy_match:.0%}",
        )
    return table


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
