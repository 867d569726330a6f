"""lora-doctor: catch LoRA weight-sync bugs between an RL trainer and its vLLM rollout engine."""

__version__ = "0.1.0"

from .check import check  # noqa: E402
from .errors import BadInput, EnvironmentProblem, LoraDoctorError, ProblemDetected  # noqa: E402
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
]
