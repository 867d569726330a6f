"""Errors that map to the documented exit codes.

Exit codes (shared by every command): 0 healthy, 1 problem found, 2 bad input, 3 environment,
4 internal error (lora-doctor itself crashed: never reported as a finding).
"""

import functools

# Distinct from 1 so that a gate never reads a crash as "problem found", and from 2/3 so that a
# bug in lora-doctor is not blamed on the user's input or machine.
INTERNAL_ERROR_EXIT_CODE = 4


class LoraDoctorError(Exception):
    """Base class: `str(error)` is the one line shown to the user."""

    exit_code = 2


class BadInput(LoraDoctorError):
    """A path, checkpoint, base model or option that cannot be used (exit 2)."""

    exit_code = 2


class EnvironmentProblem(LoraDoctorError):
    """No usable vLLM, the engine failed to start or failed while running, or out of memory (exit 3)."""

    exit_code = 3


class ProblemDetected(LoraDoctorError):
    """Raised by `gate` when a check does not pass (exit 1); carries the report."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def one_line(error: BaseException) -> str:
    """The most telling line of an exception (pydantic errors put it in the middle)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("For further information")]
    telling = [line for line in lines if "error" in line.lower()]
    return (telling or lines or [type(error).__name__])[-1]


def out_of_memory(error: BaseException) -> bool:
    """Whether an error means the machine ran out of memory (torch, Python, or the OS refusing a map)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    if isinstance(error, OSError) and error.errno == 12:  # ENOMEM
        return True
    text = str(error).lower()
    # "can't start new thread": the new thread's stack could not be mapped (seen under an address-space
    # limit: the status spinner's thread is the first to be refused).
    signs = ("can't allocate memory", "cannot allocate memory", "out of memory", "os error 12", "can't start new thread")
    return any(sign in text for sign in signs)


def memory_problem(what: str, error: BaseException) -> EnvironmentProblem:
    return EnvironmentProblem(f"not enough memory to {what} ({type(error).__name__}: {str(error).strip() or 'allocation failed'}); free memory or use a machine with more")


def engine_problem(what: str, error: BaseException) -> EnvironmentProblem:
    """The running engine failed to `what` (exit 3): out of memory, or the engine's own failure."""
    if out_of_memory(error):
        return memory_problem(f"{what} in the vLLM engine", error)
    return EnvironmentProblem(f"the vLLM engine failed to {what}: {type(error).__name__}: {one_line(error)}")


def out_of_memory_is_environment(what: str):
    """Decorate a command: out of memory anywhere inside it is an environment problem (exit 3)."""

    def decorate(function):
        @functools.wraps(function)
        def command(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except LoraDoctorError:
                raise
            except Exception as error:
                if out_of_memory(error):
                    raise memory_problem(what, error) from error
                raise

        return command

    return decorate


def unreadable_safetensors(path, error: BaseException) -> LoraDoctorError:
    """A safetensors file that cannot be read: bad input, unless the machine is out of memory."""
    if out_of_memory(error):
        return memory_problem(f"read {path}", error)
    return BadInput(f"{path} is not a readable safetensors file ({error})")
