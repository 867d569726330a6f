"""Errors that map to the documented exit codes.

Exit codes (shared by every command): 0 healthy, 1 problem found, 2 bad input, 3 environment.
"""


class LoraDoctorError(Exception):
    """Base class: `str(error)` is the one line shown to the user."""

    exit_code = 2


class BadInput(LoraDoctorError):
    """A path, checkpoint, base model or option that cannot be used (exit 2)."""

    exit_code = 2


class EnvironmentProblem(LoraDoctorError):
    """No usable vLLM, or the engine failed to start (exit 3)."""

    exit_code = 3


class ProblemDetected(LoraDoctorError):
    """Raised by `gate` when a check does not pass (exit 1); carries the report."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
