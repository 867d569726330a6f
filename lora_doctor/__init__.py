"""lora-doctor: catch LoRA weight-sync bugs between an RL trainer and its vLLM rollout engine."""

import os

# The reference forward and the vLLM engine share this process's cores. With OpenMP's default
# active waiting, idle worker threads spin and a tiny model's forward was measured 300x slower
# (0.65 s instead of 2 ms) on a busy 2-core machine; passive waiting avoids that. Read by OpenMP
# when torch loads, so it must be set before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .checker import Checker, check  # noqa: E402
from .errors import BadInput, EnvironmentProblem, LoraDoctorError, ProblemDetected  # noqa: E402
from .export_audit import audit  # noqa: E402
from .live import gate, probe  # noqa: E402
from .measure.verdict import Thresholds  # noqa: E402
from .preflight import inspect_checkpoint  # noqa: E402
from .result import ModuleResult, PhaseResult, Report, Sample  # noqa: E402

__all__ = [
    "BadInput",
    "Checker",
    "EnvironmentProblem",
    "LoraDoctorError",
    "ModuleResult",
    "PhaseResult",
    "ProblemDetected",
    "Report",
    "Sample",
    "Thresholds",
    "__version__",
    "audit",
    "check",
    "gate",
    "inspect_checkpoint",
    "probe",
]
