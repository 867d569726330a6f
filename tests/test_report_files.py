"""Report files are written whole or not at all: every text is rendered before the first file is
touched, and each file replaces the old one by a rename, so a renderer that fails (exit 4) or a write
that fails leaves the previous files as they were. Runs the real CLI on `audit` (no engine needed)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import CHECKPOINT, ROOT, run_cli

from lora_doctor import cli
from lora_doctor.output import write_files

sys.path.insert(0, str(ROOT / "fixtures"))
import build_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {"correct": build_fixtures.export_merged(out / "correct"), "merged-twice": build_fixtures.export_merged_twice(out / "merged-twice")}


def fails(_report, *args, **kwargs):
    raise RuntimeError("renderer bug")


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_crashed(run) -> None:
    """Exit 4, the one line naming the saved traceback (removed: the run's temporary folder stays clean)."""
    assert run.exit_code == 4, run.stderr
    Path(re.search(r"traceback is in (\S+)", run.stderr).group(1)).unlink()


def test_a_renderer_that_fails_leaves_the_previous_report_folder_and_json_intact(exports, tmp_path, monkeypatch):
    folder, json_path = tmp_path / "report", tmp_path / "report.json"
    first = run_cli("audit", exports["correct"], "--adapter", CHECKPOINT, "--report", folder, "--json", json_path, "--quiet")
    assert first.exit_code == 0, first.stderr
    before, json_before = contents(folder), json_path.read_bytes()
    assert sorted(before) == ["report.html", "report.json", "report.md"]

    monkeypatch.setattr("lora_doctor.report.render_html", fails)  # the last renderer of the folder
    second = run_cli("audit", exports["merged-twice"], "--adapter", CHECKPOINT, "--report", folder, "--json", json_path, "--quiet")
    assert_crashed(second)
    # The first run's files, byte for byte (its report.json says exit 0 and the process said 0), no temporary file beside them.
    assert contents(folder) == before and json.loads(before["report.json"])["exit_code"] == 0
    assert json_path.read_bytes() == json_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "report.json"]


def test_report_output_of_a_failing_terminal_renderer_keeps_the_old_file(exports, tmp_path, monkeypatch):
    saved = tmp_path / "audit.json"
    assert run_cli("audit", exports["merged-twice"], "--adapter", CHECKPOINT, "--json", saved, "--quiet").exit_code == 1
    output = tmp_path / "report.txt"
    output.write_text("the previous rendering\n")
    monkeypatch.setattr("lora_doctor.report.render_terminal", fails)
    assert_crashed(run_cli("report", saved, "--output", output))
    assert output.read_text() == "the previous rendering\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "report.txt"]


def test_a_write_that_fails_does_not_truncate_the_existing_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text('{"exit_code": 0}')
    with pytest.raises(UnicodeEncodeError):
        cli._write("\ud800 a lone surrogate cannot be encoded", target)  # fails while the bytes are written
    assert target.read_text() == '{"exit_code": 0}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_written_file_has_the_permissions_of_a_new_file(tmp_path):
    target = tmp_path / "report.md"
    cli._write("# report\n", target)
    reference = tmp_path / "reference.md"
    reference.write_text("# report\n")
    assert target.read_text() == "# report\n"
    assert target.stat().st_mode == reference.stat().st_mode


def test_a_folder_write_that_fails_on_one_file_replaces_none(tmp_path):
    folder = tmp_path / "report"
    write_files(folder, {"report.json": "old json", "report.md": "old md"})
    with pytest.raises(UnicodeEncodeError):
        write_files(folder, {"report.json": "new json", "report.md": "\ud800 cannot be encoded"})
    assert contents(folder) == {"report.json": b"old json", "report.md": b"old md"}
