"""Write the expected renderings of the saved reports beside them: `python tests/data/reports/render.py`.

The saved reports (`*.json`) are real `lora-doctor check` and `audit` runs on the fixtures (paths made
relative); their expected terminal, Markdown and HTML views were written by this script from the
renderers as they were before a refactor, and tests/test_saved_reports.py holds the renderers to them.
Run it again only when a view is meant to change, and review the diff.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from lora_doctor.report import render_html, render_markdown, render_terminal
from lora_doctor.result import Report

HERE = Path(__file__).parent
# The width the CLI gives a console that is not a terminal (`lora-doctor report -f terminal -o FILE`).
WIDTH = 140


def terminal(report: Report, all_modules: bool = False) -> str:
    console = Console(file=io.StringIO(), width=WIDTH)
    render_terminal(report, console, all_modules=all_modules)
    return console.file.getvalue()


VIEWS = {
    "terminal.txt": terminal,
    "all-modules.txt": lambda report: terminal(report, all_modules=True),
    "md": render_markdown,
    "html": render_html,
}


def saved_reports() -> list[Path]:
    return sorted(HERE.glob("*.json"))


def load(path: Path) -> Report:
    return Report.from_dict(json.loads(path.read_text(encoding="utf-8")))


def expected_path(path: Path, view: str) -> Path:
    return path.with_name(f"{path.stem}.expected.{view}")


if __name__ == "__main__":
    for path in saved_reports():
        report = load(path)
        for view, render in VIEWS.items():
            expected_path(path, view).write_text(render(report), encoding="utf-8")
