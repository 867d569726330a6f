"""Where output goes: the user sees lora-doctor's progress and report; the engine's chatter goes to a log.

vLLM, torch and transformers write to the process's file descriptors directly (progress bars,
C++ warnings such as the NUMA-binding notice, logging set up before ours), so quieting their loggers
is not enough: during the work, descriptors 1 and 2 point at a log file, and lora-doctor writes its
progress to a copy of the original stderr.

Report files are written whole or not at all: every text is rendered before the first file is
touched, and each file goes to a temporary name in its own folder, then is renamed into place, so a
failed renderer or a kill mid-write leaves the previous files as they were.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import EnvironmentProblem, LoraDoctorError


@dataclass
class Captured:
    """The user's stderr while the engine's output is captured, and the log it goes to (None: not captured)."""

    stderr: TextIO
    log: Path | None


@contextmanager
def engine_output_to_log(enabled: bool = True) -> Iterator[Captured]:
    """Send everything written to stdout/stderr inside the block to a log file.

    The log is deleted when the block succeeds, when it raises an error the user's one line does not
    point it to (bad input, a measured problem), and when the process is stopped (Ctrl-C, SIGTERM:
    not an error); otherwise (the environment's failure, a crash) the log is kept and its path is set
    on the exception as `engine_log`, for the line to name it.
    """
    if not enabled:
        yield Captured(sys.stderr, None)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    handle, name = tempfile.mkstemp(prefix="lora-doctor-engine-", suffix=".log")
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    user_stderr = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    for fd in saved:
        os.dup2(handle, fd)
    os.close(handle)
    kept = False
    try:
        yield Captured(user_stderr, Path(name))
    except BaseException as error:
        kept = isinstance(error, Exception) and (not isinstance(error, LoraDoctorError) or isinstance(error, EnvironmentProblem))
        if kept:
            error.engine_log = Path(name)
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        user_stderr.close()
        if not kept:
            Path(name).unlink(missing_ok=True)


def write_file(path: str | Path, text: str) -> None:
    """Replace `path` with `text` at once: a temporary file in the same folder, renamed into place."""
    write_files(Path(path).parent, {Path(path).name: text}, create=False)


def write_files(folder: str | Path, texts: dict[str, str], create: bool = True) -> None:
    """Write already rendered `texts` ({file name: text}) into `folder` (created if missing): every
    text to a temporary file first, then each renamed into place, so a failure before the renames
    leaves every old file as it was, and a kill during them leaves each file whole (old or new)."""
    folder = Path(folder)
    if create:
        folder.mkdir(exist_ok=True)
    written: dict[Path, str] = {}
    try:
        for name, text in texts.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            written[folder / name] = temporary
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, _default_mode())
        for path, temporary in written.items():
            os.replace(temporary, path)
    finally:
        for temporary in written.values():
            Path(temporary).unlink(missing_ok=True)


def _default_mode() -> int:
    """The mode `open()` gives a new file (mkstemp's is 0600: a report is no secret)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_crash(error: BaseException) -> Path:
    """Write the full traceback of an unexpected error to a file the user can attach to a bug report."""
    handle, name = tempfile.mkstemp(prefix="lora-doctor-crash-", suffix=".txt")
    with os.fdopen(handle, "w") as crash:
        crash.write(f"lora-doctor {' '.join(sys.argv[1:])}\n\n")
        crash.write("".join(traceback.format_exception(error)))
        log = getattr(error, "engine_log", None)
        if log is not None:
            crash.write(f"\nengine log: {log}\n")
    return Path(name)
