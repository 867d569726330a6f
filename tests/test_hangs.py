"""A hang fails its own test, within its time limit, and the run goes on.

A run of pytest in a process of its own, with the suite's plugins (the per-test limit, the clean-up
check), on three tests: a real engine whose request never finishes (the engine makes no progress, as
for a request it dropped), a subprocess that leaves a grandchild running and outlives its limit, and
a test after them that must still run.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import psutil
import pytest
from conftest import BASE, ROOT, subprocess_env
from hygiene import MARK
from processes import kill_group, run_process

# The inner tests' own limit (their fixtures excluded: the engine is built in one).
INNER_LIMIT = 10

INNER_TESTS = '''
import sys

import pytest
from processes import run_process

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    llm = LLM(model={base!r}, dtype="float32", max_model_len=256, enforce_eager=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()  # and with it the engine's rendezvous file


def test_an_engine_request_that_never_finishes(llm):
    from vllm import SamplingParams

    assert llm.generate(["The capital of France is"], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.llm_engine.step = lambda: []  # no progress from now on: the request is never finished
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=2), use_tqdm=False)


def test_a_process_group_that_outlives_its_limit():
    child = "import subprocess, time; p = subprocess.Popen(['sleep', '600']); open({pid_file!r}, 'w').write(str(p.pid)); time.sleep(600)"
    run_process([sys.executable, "-c", child], timeout=600)


def test_the_run_goes_on():
    assert True
'''


@pytest.mark.timeout(300)
def test_a_hang_fails_its_test_within_the_limit_and_the_run_goes_on(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    tests = tmp_path / "test_inner.py"
    tests.write_text(INNER_TESTS.format(base=str(BASE), pid_file=str(pid_file)))
    results = tmp_path / "results.xml"
    # The inner run's options are its own: none of the outer run's (PYTEST_ADDOPTS may change the output).
    env = {name: value for name, value in subprocess_env({"PYTHONPATH": str(ROOT / "tests")}).items() if name != "PYTEST_ADDOPTS"}
    command = [sys.executable, "-m", "pytest", str(tests), "-p", "hygiene", "-p", "no:cacheprovider", "-o", "timeout_func_only=true",
               "--timeout", str(INNER_LIMIT), "--timeout-method", "signal", "-q", f"--junitxml={results}"]
    done = run_process(command, env=env, cwd=tmp_path, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-4000:]
    assert re.search(r"2 failed, 1 passed", output), output[-4000:]
    # Each hang failed on its own limit, with the stack where it hung; the test after them passed.
    outcomes = {case.get("name"): case for case in ET.parse(results).iter("testcase")}
    assert set(outcomes) == {"test_an_engine_request_that_never_finishes", "test_a_process_group_that_outlives_its_limit",
                             "test_the_run_goes_on"}, output[-4000:]
    for name in ("test_an_engine_request_that_never_finishes", "test_a_process_group_that_outlives_its_limit"):
        failure = outcomes[name].find("failure")
        assert failure is not None and f"Timeout (>{INNER_LIMIT:.1f}s)" in failure.get("message", ""), output[-4000:]
    engine_failure = outcomes["test_an_engine_request_that_never_finishes"].find("failure").text or ""
    assert "has_unfinished_requests" in engine_failure or "_run_engine" in engine_failure, engine_failure[-4000:]
    assert not list(outcomes["test_the_run_goes_on"]), output[-4000:]  # no failure, error or skip
    # The grandchild went with its group; nothing of the inner run was left behind.
    grandchild = int(pid_file.read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert "hygiene: no process left running, nothing left in" in output, output[-4000:]


SLEEPING_TEST = '''
import time
from pathlib import Path


def test_sleeps():
    Path({started!r}).write_text("started")
    time.sleep(600)
'''


@pytest.mark.timeout(120)
def test_a_run_stopped_by_sigterm_removes_its_temporary_folder(tmp_path):
    # What `timeout` or a cancelled CI run sends: the run's folder goes as at a normal end.
    started = tmp_path / "started"
    (tmp_path / "test_inner.py").write_text(SLEEPING_TEST.format(started=str(started)))
    machine_tmp = tmp_path / "tmp"
    machine_tmp.mkdir()
    env = {name: value for name, value in subprocess_env({"PYTHONPATH": str(ROOT / "tests"), "TMPDIR": str(machine_tmp)}).items()
           if name not in ("PYTEST_ADDOPTS", MARK)}
    command = [sys.executable, "-m", "pytest", str(tmp_path / "test_inner.py"), "-p", "hygiene", "-p", "no:cacheprovider", "-q"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not started.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.1)
        assert [path.name for path in machine_tmp.iterdir() if path.name.startswith("lora-doctor-tests-")]  # the run's folder
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        kill_group(process)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    # The machine's compile cache (torchinductor_*) is torch's, kept for every later process.
    assert [path.name for path in machine_tmp.iterdir() if not path.name.startswith("torchinductor_")] == [], output[-3000:]
