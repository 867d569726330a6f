"""The test run cleans up after itself: a pytest plugin (conftest.py loads it; `pytest -p hygiene` too).

Imported before anything creates a temporary file, it gives the session a temporary folder of its own
(TMPDIR, inherited by every subprocess): what the suite, lora-doctor or vLLM leave behind lands there,
not among the machine's other files. At the end of the run the folder must hold nothing but pytest's
own per-test folders, and no process the run started may still be alive; otherwise the run fails,
naming what was left (then removed, so that the next run starts clean).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest

# torch's compile cache (vLLM's CPU kernels compile through it; its precompiled header alone costs
# ~10 s of g++ per process when cold) stays where torch keeps it for every user of the machine, shared
# by the run's processes whatever temporary folder they are given: it is torch's, not the run's. torch
# finds part of it through TORCHINDUCTOR_CACHE_DIR and part (the precompiled headers) only in the
# temporary folder, where a link to it stands in.
COMPILE_CACHE = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))


def share_compile_cache(folder: Path) -> None:
    """Give a temporary folder the machine's compile cache (a link, removed with the folder)."""
    COMPILE_CACHE.mkdir(exist_ok=True)
    (folder / COMPILE_CACHE.name).symlink_to(COMPILE_CACHE, target_is_directory=True)


# Inherited by every process the run starts, grandchildren that leave their parent included.
MARK = "LORA_DOCTOR_TEST_RUN"
# pytest-xdist's workers share the run's folder and mark; the run (the controlling process) checks them.
WORKER = "PYTEST_XDIST_WORKER" in os.environ and MARK in os.environ
if WORKER:
    SESSION_TMP = Path(os.environ["TMPDIR"])
else:
    SESSION_TMP = Path(tempfile.mkdtemp(prefix="lora-doctor-tests-"))
    share_compile_cache(SESSION_TMP)
    os.environ[MARK] = SESSION_TMP.name
    os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = str(SESSION_TMP)
STARTED = time.time()


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (`timeout`, a cancelled CI run) stops the run as Ctrl-C does: pytest then ends the session
    and `pytest_unconfigure` removes the run's folder, which the signal's default action left in /tmp."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the run at once
    raise KeyboardInterrupt


if not WORKER:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)


def leftover_files() -> list[str]:
    """What the run left in its temporary folder, beside pytest's own folders and the compile cache (a
    folder with what it holds, so that the name says whose it is)."""
    left = sorted(entry for entry in SESSION_TMP.iterdir() if entry.name != COMPILE_CACHE.name and not entry.name.startswith("pytest-of-"))
    return [_described(entry) for entry in left]


def _described(entry: Path) -> str:
    if not entry.is_dir() or entry.is_symlink():
        return entry.name
    inside = sorted(str(path.relative_to(entry)) for path in entry.rglob("*"))
    return f"{entry.name} (holding: {', '.join(inside[:8]) or 'nothing'}{', ...' if len(inside) > 8 else ''})"


def leftover_processes() -> list[psutil.Process]:
    """Processes the run started that are still alive: this one's children, and any process carrying
    the run's mark in its environment (a grandchild whose parent died is no child of this one)."""
    me = psutil.Process()
    found = {child.pid: child for child in me.children(recursive=True)}
    for process in psutil.process_iter(["pid", "create_time"]):
        try:
            if process.pid != me.pid and process.info["create_time"] >= STARTED and process.environ().get(MARK) == SESSION_TMP.name:
                found.setdefault(process.pid, process)
        except psutil.Error:
            continue
    alive = []
    for process in found.values():
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return str(process.pid)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if WORKER:
        return
    problems = []
    stray = leftover_processes()
    if stray:
        problems.append("processes still running: " + "; ".join(describe(process) for process in stray))
        for process in stray:
            try:
                process.kill()
            except psutil.Error:
                pass
    files = leftover_files()
    if files:
        problems.append(f"left in the run's temporary folder: {', '.join(files)}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if problems:
        for problem in problems:
            if reporter is not None:
                reporter.write_line(f"hygiene: {problem}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line(f"hygiene: no process left running, nothing left in {SESSION_TMP}")


def pytest_unconfigure(config):
    # After pytest's own clean-up of its per-test folders: nothing of the run stays in the machine's /tmp.
    if not WORKER:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)
