"""The renderers on saved reports: every view byte-identical to the one committed beside the report.

`tests/data/reports/*.json` are real check and audit runs on the fixtures (a double count, a stale
adapter, an rsLoRA scaling confusion, a stale prefix cache, a check stopped at the pre-flight; audits
ok, partial, missing, scaled, non_finite, bf16 merged once and twice). Their terminal (default and `--all-modules`), Markdown and HTML views
were written by `tests/data/reports/render.py` before the verdict catalog and the audit moved:
what those moves touch must not change a byte of what a user reads. The JSON view of each is the
saved file itself. One report was added with a fix: a non_finite audit, whose NaN figures a saved JSON
holds as null, crashed the terminal view (exit 4); its Markdown and HTML views are the earlier renderers'.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_cli

from lora_doctor.report import render_json

DATA = Path(__file__).parent / "data" / "reports"
sys.path.insert(0, str(DATA))
import render  # noqa: E402

SAVED = render.saved_reports()


def test_the_saved_reports_cover_check_and_audit_verdicts():
    verdicts = {phase.verdict for path in SAVED for phase in render.load(path).phases}
    measured = {phase.measured for path in SAVED for phase in render.load(path).phases}
    assert {"ok", "double_counted", "stale", "scaled", "stale_cache", "partial", "missing"} <= verdicts
    assert {"engine", "export"} <= measured


@pytest.mark.parametrize("view", sorted(render.VIEWS))
@pytest.mark.parametrize("path", SAVED, ids=[path.stem for path in SAVED])
def test_view_is_byte_identical(path, view):
    expected = render.expected_path(path, view).read_bytes()
    got = render.VIEWS[view](render.load(path)).encode("utf-8")
    if got != expected:
        # The first differing line, to read in the failure rather than the whole page.
        for number, (mine, theirs) in enumerate(zip(got.splitlines(), expected.splitlines()), 1):
            if mine != theirs:
                pytest.fail(f"{path.name} {view}: line {number} differs:\n  got      {mine!r}\n  expected {theirs!r}")
        pytest.fail(f"{path.name} {view}: {len(got)} bytes rendered, {len(expected)} expected")


@pytest.mark.parametrize("path", SAVED, ids=[path.stem for path in SAVED])
def test_json_view_is_the_saved_report(path):
    assert render_json(render.load(path)) == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", SAVED, ids=[path.stem for path in SAVED])
def test_the_report_command_prints_each_saved_report_with_its_exit_code(path):
    run = run_cli("report", path)
    assert run.exit_code == render.load(path).exit_code, run.stderr
    assert run.stdout.splitlines()[0].startswith("lora-doctor ")
