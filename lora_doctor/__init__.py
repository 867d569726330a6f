"""lora-doctor: catch LoRA weight-sync bugs between an RL trainer and its vLLM rollout engine.

Importing the package changes nothing in the caller's process (no environment variable, no torch
yet): the API is loaded on first use. On CPU, set `OMP_WAIT_POLICY=PASSIVE` before torch loads (the
`lora-doctor` command does so for its own process): see `cli.run`.
"""

import importlib

from .version import __version__ as __version__

# Public name → the module that defines it, imported when the name is first used.
_API = {
    "Checker": "checker",
    "check": "checker",
    "BadInput": "errors",
    "EnvironmentProblem": "errors",
    "LoraDoctorError": "errors",
    "ProblemDetected": "errors",
    "audit": "export_audit",
    "gate": "live",
    "probe": "live",
    "Thresholds": "measure.verdict",
    "inspect_checkpoint": "preflight",
    "ModuleResult": "result",
    "PhaseResult": "result",
    "Report": "result",
    "Sample": "result",
}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lora_doctor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = sorted([*_API, "__version__"])
