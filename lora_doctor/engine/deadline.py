"""No engine request without a deadline.

vLLM's in-process engine has no timeout of its own (its timeouts are the multiprocess executors'):
a request the engine drops never finishes, and a step that never returns holds the caller forever.
Two guards, each for what the other cannot see:

- the request loop (`Stall`): lora-doctor steps the engine itself and measures its own requests'
  progress; when none of them has moved for the engine timeout, it aborts them and raises
  `EngineStalled` (exit 3);
- the command's watchdog (`watchdog`): one engine call (a step, a worker RPC) that has not returned
  by the engine timeout plus `GRACE_SECONDS` cannot be interrupted from Python, so the `lora-doctor`
  command prints its one line, removes its temporary files and ends the process with exit 3. A
  library caller (a trainer) gets no watchdog: its process is not lora-doctor's to end. The
  watchdog is a Python thread: it runs while the call waits or computes in torch (whose operators
  release the interpreter's lock: it ticked throughout a 6 s matmul here), not while a C call holds
  that lock and never returns.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from ..errors import BadInput, EnvironmentProblem

# Ten minutes: the slowest healthy engine call seen is a full-weights reload of a large model on
# the CPU build (minutes); a stall is hours of nothing. Small enough that a pipeline's gate ends.
DEFAULT_ENGINE_TIMEOUT = 600.0
# How long past the engine timeout one engine call may run before the command's watchdog ends the
# process: the request loop's own check (at the timeout) comes first when the call returns at all.
GRACE_SECONDS = 5.0
# How often the watchdog looks.
WATCHDOG_PERIOD = 0.5


class EngineStalled(EnvironmentProblem):
    """The engine made no progress on lora-doctor's requests for the engine timeout (exit 3)."""


class EngineUnavailable(EnvironmentProblem):
    """The engine does not serve requests now (asleep: its scheduler paused); none was sent (exit 3)."""


def check_timeout(seconds: float, option: str = "--engine-timeout") -> float:
    """A usable engine timeout (seconds, above 0 and finite), or bad input (exit 2)."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise BadInput(f"{option} must be a number of seconds, got {seconds!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise BadInput(f"{option} must be a number of seconds above 0, got {seconds!r}")
    return value


class Stall:
    """Seconds since lora-doctor's requests last made progress, against the engine timeout."""

    def __init__(self, timeout: float, what: str):
        self.timeout = timeout
        self.what = what
        self._last = time.monotonic()
        self._mark = None

    def observe(self, mark) -> None:
        """`mark` is what the requests have produced so far: any change is progress; none for the
        timeout is a stall (`EngineStalled`)."""
        now = time.monotonic()
        if mark != self._mark:
            self._mark, self._last = mark, now
        elif now - self._last > self.timeout:
            raise EngineStalled(
                f"the vLLM engine stalled: no progress on lora-doctor's {self.what} for {now - self._last:.0f} s "
                f"(engine timeout {self.timeout:g} s); lora-doctor aborted its requests"
            )


# The engine call under way (what, since when), for the watchdog: None between calls.
_call: tuple[str, float] | None = None
_depth = 0


@contextmanager
def engine_call(what: str) -> Iterator[None]:
    """One call into the engine that Python cannot interrupt; the outermost one is timed."""
    global _call, _depth
    if _depth == 0:
        _call = (what, time.monotonic())
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _call = None


@contextmanager
def watchdog(timeout: float, say: TextIO, log: Path | None) -> Iterator[None]:
    """For the block: end the process (exit 3, one line on `say`, naming `log`) when one engine
    call runs past `timeout` + `GRACE_SECONDS`. The block's temporary files go to a folder of its
    own, removed at its end and before such an exit (the engine's own folder, adapters written by
    the plan, vLLM's rendezvous file), since `os._exit` runs no clean-up of the process's."""
    # torch fixes its precompiled headers' folder from the temporary folder when its code cache is first
    # imported (vLLM imports it): imported before the redirect, it stays the process's own, not this
    # folder, which a later compile in the same process (a training script's) would make again.
    import torch._inductor.codecache  # noqa: F401

    # A short name: the engine's sockets (tensor-parallel ranks) are made in a folder inside it, and
    # a socket's path must fit in 107 characters.
    folder = tempfile.mkdtemp(prefix="ld-")
    _share_compile_cache(Path(folder))
    saved = tempfile.tempdir
    tempfile.tempdir = folder
    done = threading.Event()

    def expire(what: str, seconds: float) -> None:
        where = f" (engine log: {log})" if log is not None else ""
        say.write(
            f"error: the vLLM engine stalled: one engine call ({what}) has not returned after {seconds:.0f} s "
            f"(engine timeout {timeout:g} s); lora-doctor stopped{where}\n"
        )
        say.flush()
        shutil.rmtree(folder, ignore_errors=True)
        sys.stdout.flush()
        os._exit(EngineStalled.exit_code)

    def watch() -> None:
        while not done.wait(WATCHDOG_PERIOD):
            call = _call
            if call is not None and time.monotonic() - call[1] > timeout + GRACE_SECONDS:
                expire(call[0], time.monotonic() - call[1])

    thread = threading.Thread(target=watch, name="lora-doctor-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        tempfile.tempdir = saved
        _remove(folder)


def _remove(folder: str, attempts: int = 20) -> None:
    """Remove the block's folder, again if something (a closing engine's file) appeared in it while it
    was being removed; at most `attempts` tries, 0.1 s apart."""
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            return
        time.sleep(0.1)


def _share_compile_cache(folder: Path) -> None:
    """torch's compile cache (vLLM's CPU kernels; its precompiled header alone is ~10 s of g++ when
    cold) is looked up in the temporary folder: the run's folder links to the machine's, so that a
    check neither rebuilds it nor takes it away (removing the folder removes only the link)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = Path(default_cache_dir())
    if cache.parent == Path(tempfile.gettempdir()):
        cache.mkdir(exist_ok=True)
        (folder / cache.name).symlink_to(cache, target_is_directory=True)
