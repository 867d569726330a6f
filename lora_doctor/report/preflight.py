"""Views of a `PreflightReport` (lora-doctor inspect): a terminal table and the JSON contract."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..preflight import PreflightReport

SEVERITY_STYLE = {"problem": "bold red", "warning": "yellow", "info": "cyan"}


def render_preflight_terminal(report: PreflightReport, console: Console) -> None:
    """Print the checkpoint summary, one row per finding, and the counts line."""
    ckpt = report.checkpoint
    rslora = ", rsLoRA" if ckpt["use_rslora"] else ""
    dtype = ckpt.get("adapter_dtype")
    dtype = "/".join(dtype) if isinstance(dtype, list) else dtype
    console.print(
        f"[bold]lora-doctor inspect[/]  checkpoint [cyan]{ckpt['path']}[/]\n"
        f"base {ckpt['base_path']} ({'/'.join(ckpt.get('architectures') or []) or 'unknown architecture'}, "
        f"{ckpt.get('base_dtype') or '?'})\n"
        f"r={ckpt['r']} (max {ckpt['max_rank']}) alpha={ckpt['lora_alpha']:g}{rslora} scaling={ckpt['scaling']:g}  "
        f"{ckpt['lora_modules']} LoRA modules ({dtype})  targets: {', '.join(ckpt['target_modules'])}",
        highlight=False,
    )
    if report.findings:
        table = Table(title="pre-flight findings", title_justify="left", show_lines=True)
        table.add_column("severity", no_wrap=True)
        table.add_column("code", no_wrap=True)
        table.add_column("message", ratio=3, overflow="fold")
        table.add_column("fix", ratio=2, overflow="fold")
        for finding in report.findings:
            table.add_row(
                Text(finding.severity, style=SEVERITY_STYLE.get(finding.severity, "")),
                finding.code,
                finding.message,
                Text(finding.fix, style="dim"),
            )
        console.print(table)
    else:
        console.print(Text("no findings: nothing an engine is known to refuse, drop or scale differently", style="green"))
    problems, warnings = len(report.problems), len(report.warnings)
    style = "bold red" if problems else ("yellow" if warnings else "bold green")
    console.print(Text(f"preflight: {problems} problems, {warnings} warnings", style=style))


def render_preflight_json(report: PreflightReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
