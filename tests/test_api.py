"""The library's entry points are where the README says they are, and do what it says."""

from __future__ import annotations

import importlib
import re

from conftest import CHECKPOINT, ROOT

import lora_doctor


def test_checker_is_reachable_by_every_documented_path_and_runs_a_plan_by_name(checker):
    # `lora_doctor.check` is the function; the module that holds Checker has its own name.
    module = importlib.import_module("lora_doctor.checker")
    assert lora_doctor.Checker is module.Checker is lora_doctor.checker.Checker
    assert callable(lora_doctor.check) and not isinstance(lora_doctor.check, type(module))
    assert isinstance(checker, lora_doctor.Checker)

    report = checker.run("swift-colocate-lora")
    assert [p.name for p in report.phases] == ["full-merged", "adapter"]
    assert [p.verdict for p in report.phases] == ["ok", "double_counted"]
    assert report.exit_code == 1


def test_inspect_and_audit_are_top_level_functions():
    findings = lora_doctor.inspect_checkpoint(CHECKPOINT)
    assert findings.exit_code == 0 and findings.checkpoint["lora_modules"] == 14
    assert lora_doctor.audit.__module__ == "lora_doctor.export_audit.run"


def test_one_version_and_no_module_imports_the_package_for_it():
    from lora_doctor.version import __version__

    project = re.search(r'^\[project\][^\[]*?^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M | re.S)
    assert lora_doctor.__version__ == __version__ == project.group(1)
    # The package's modules read it from lora_doctor/version.py, never through the package's __init__.
    root_import = re.compile(r"from \.+ import [^\n]*__version__|lora_doctor\.__version__|from lora_doctor import [^\n]*__version__")
    importers = [
        path.relative_to(ROOT)
        for path in (ROOT / "lora_doctor").rglob("*.py")
        if root_import.search(path.read_text(encoding="utf-8"))
    ]
    assert importers == []
