"""What the pre-flight reports: one `Finding` per thing an engine refuses, drops or computes differently,
gathered in a `PreflightReport` (the JSON contract of `lora-doctor inspect`, docs/json-report.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 1
SEVERITIES = ("problem", "warning", "info")
# Problems that make vLLM refuse to load the adapter (its own ValueError after the engine started):
# an adapter sync of it cannot run, a merged sync can.
ADAPTER_REFUSED = frozenset({
    "modules_to_save", "lora_on_lm_head", "lora_on_embed_tokens", "trainable_tokens", "dora", "lora_bias",
    "init_modifies_base", "unsupported_feature", "bias", "rank_above_max", "unrecognized_tensor",
})


@dataclass(frozen=True)
class Finding:
    """One thing an engine will refuse, drop or compute differently from the trainer."""

    code: str
    severity: str  # "problem" | "warning" | "info"
    message: str
    fix: str
    # The module / tensor / config names concerned (full list; the message may abbreviate).
    subjects: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
            "subjects": list(self.subjects),
        }


@dataclass
class PreflightReport:
    checkpoint: dict
    findings: list[Finding] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "problem"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "kind": "preflight",
            "checkpoint": dict(self.checkpoint),
            "findings": [f.to_dict() for f in self.findings],
            "exit_code": self.exit_code,
        }
