"""One catalog of verdicts (`lora_doctor/catalog.py`) for check and audit alike: every verdict the rules
give is in it, with its meaning and cause, no other module spells them out, and the docs name them all."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

from lora_doctor import catalog
from lora_doctor.catalog import AUDIT_VERDICTS, CATALOG, EXPORT_PHASE, OK, PHASE_VERDICTS, cause_for, explanation
from lora_doctor.result import PhaseResult

PACKAGE = ROOT / "lora_doctor"


def _phase(verdict: str, measured: str = "engine") -> PhaseResult:
    return PhaseResult(0, "phase", False, verdict, "", None, None, None, None, None, None, measured=measured)


def test_every_unhealthy_verdict_has_a_meaning_and_a_cause():
    assert PHASE_VERDICTS[0] == OK and len(set(PHASE_VERDICTS)) == len(PHASE_VERDICTS) == 12
    for name, entry in CATALOG.items():
        assert entry.name == name and entry.check
        assert (entry.cause is None) == (name == OK), name
        if name in AUDIT_VERDICTS:
            assert entry.audit and (entry.audit_cause is None) == (name == OK), name


def test_check_and_audit_read_their_own_text_from_one_entry():
    for name in AUDIT_VERDICTS:
        assert explanation(name) == CATALOG[name].check
        assert explanation(name, EXPORT_PHASE) == CATALOG[name].audit != CATALOG[name].check
        assert cause_for(_phase(name)) == CATALOG[name].cause
        assert cause_for(_phase(name, measured=EXPORT_PHASE)) == CATALOG[name].audit_cause
    assert set(AUDIT_VERDICTS) == {"ok", "double_counted", "missing", "scaled", "partial", "diverged", "non_finite"}
    assert cause_for(_phase("a verdict of a newer version")) is None  # a saved report from elsewhere still renders


def test_no_other_module_spells_out_a_verdict():
    """The meanings and causes are written once: no other source file holds one of them."""
    texts = [text for entry in CATALOG.values() for text in (entry.check, entry.cause, entry.audit, entry.audit_cause) if text]
    # A phrase of each text (its first 40 characters), as source code would hold it.
    phrases = {text[:40] for text in texts}
    catalog_file = Path(catalog.__file__).resolve()
    for path in PACKAGE.rglob("*.py"):
        if path.resolve() == catalog_file:
            continue
        source = path.read_text(encoding="utf-8")
        found = [phrase for phrase in phrases if phrase in source]
        assert not found, f"{path.relative_to(ROOT)} spells out {found}"
    # Nor does any module keep a table of verdict names to explanations or causes.
    for path in PACKAGE.rglob("*.py"):
        if path.resolve() != catalog_file:
            assert not re.search(r"^(EXPLANATIONS|CAUSES|EXPORT_CAUSES)\s*=", path.read_text(encoding="utf-8"), re.M), path


def test_the_docs_name_every_verdict():
    verdicts_doc = (ROOT / "docs" / "verdicts-and-thresholds.md").read_text(encoding="utf-8").split("## What a phase")[0]
    audit_doc = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    assert [name for name in PHASE_VERDICTS if f"`{name}`" not in verdicts_doc] == []
    assert [name for name in AUDIT_VERDICTS if f"`{name}`" not in audit_doc] == []
    assert "lora_doctor/catalog.py" in verdicts_doc
