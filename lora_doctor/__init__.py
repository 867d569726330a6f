"""lora-doctor: catch LoRA weight-sync bugs between an RL trainer and its vLLM rollout engine."""

import os

# The reference forward and the vLLM engine share this process's cores. With OpenMP's default
# active waiting, idle worker threads spin and a tiny model's forward was measured 300x slower
# (0.65 s instead of 2 ms) on a busy 2-core machine; passive waiting avoids that. Read by OpenMP
# when torch loads, so it must be set before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .check import check  # noqa: E402
from .errors import BadInput, EnvironmentProblem, LoraDoctorError, ProblemDetected  # noqa: E402
from .live import gate, probe  # noqa: E402
from .result import LayerResult, PhaseResult, Report, Sample  # noqa: E402
from .verdict import Thresholds  # noqa: E402

__all__ = [
    "BadInput",
    "EnvironmentProblem",
    "LayerResult",
    "LoraDoctorError",
    "PhaseResult",
    "ProblemDetected",
    "Report",
    "Sample",
    "Thresholds",
    "__version__",
    "check",
    "gate",
    "probe",
]
