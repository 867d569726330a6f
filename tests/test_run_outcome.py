"""What fails after start-up gets the exit code of whoever failed: the plan's own code or its misuse
of the sync handle 2, lora-doctor's code 4 (under a custom plan as under a built-in one), an adapter
vLLM refuses 2, the engine failing (dead included) 3; a check stopped by SIGTERM cleans up, exit 143."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
from conftest import CHECKPOINT, ROOT, assert_one_line_error, run_cli, run_cli_process, subprocess_env
from hygiene import share_compile_cache
from processes import kill_group

pytestmark = pytest.mark.slow  # most cases start an engine

PLANS = ROOT / "tests" / "outcome_plans.py"


def crashed(run, needle: str) -> None:
    """Exit 4 naming `needle`; the saved traceback and the engine log it names are removed."""
    assert run.exit_code == 4, run.stderr
    assert needle in run.stderr, run.stderr
    saved = Path(re.search(r"traceback is in (\S+)", run.stderr).group(1))
    text = saved.read_text()
    saved.unlink()
    log = re.search(r"engine log: (\S+)", text)
    if log:
        Path(log.group(1)).unlink(missing_ok=True)


# A custom plan, a built-in one, and a built-in one named as a custom plan (its file is lora-doctor's code).
@pytest.mark.parametrize("plan", [f"{PLANS}:merges", "merged", "lora_doctor.plans.builtin:merged"])
def test_lora_doctors_own_failure_under_a_plan_is_a_crash(plan, tmp_path, monkeypatch):
    # lora-doctor's merge failing as a bug would, reached through the plan's `sync.load_merged()`:
    # the same exit 4 under a custom plan (it was 2, "plan failed") as under a built-in one.
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("lora_doctor.plans.sync.MergedWeights", broken)
    run = run_cli("check", CHECKPOINT, "--plan", plan, "--json", tmp_path / "r.json")
    crashed(run, "internal error: ZeroDivisionError")
    assert not (tmp_path / "r.json").exists()


def test_an_adapter_the_engine_refuses_is_bad_input(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", f"{PLANS}:adds_a_broken_adapter", "--json", tmp_path / "r.json")
    assert_one_line_error(run, 2, "the engine refused the adapter", unwritten=tmp_path / "r.json")


@pytest.mark.parametrize(
    ("plan", "needle"),
    [("adds_the_adapter_to_a_dead_engine", "failed to load the adapter"), ("probes_a_dead_engine", "failed to list its loaded adapters")],
)
def test_a_dead_engine_under_a_plan_is_the_environment(plan, needle, tmp_path):
    # The process's temporary folder, removed after: the engine's log (kept on exit 3) and what the killed workers leave.
    own_tmp = Path(tempfile.mkdtemp(prefix="d-"))
    try:
        run = run_cli_process("check", CHECKPOINT, "--plan", f"{PLANS}:{plan}", "-tp", "2", "--json", tmp_path / "r.json", timeout=900, env={"TMPDIR": str(own_tmp)})
    finally:
        shutil.rmtree(own_tmp, ignore_errors=True)
    assert run.exit_code == 3, run.stderr
    assert needle in run.stderr, run.stderr
    assert not (tmp_path / "r.json").exists()


def test_the_trl_example_exits_2_when_no_probe_ran(capsys):
    # A run that ended before its first optimizer step measured nothing: no healthy sync (0) to report.
    sys.path.insert(0, str(ROOT / "examples"))
    import trl_grpo_probe

    from lora_doctor.callback import LoraDoctorCallback

    assert trl_grpo_probe.report(None, LoraDoctorCallback(None, None), None) == 2
    assert "no probe ran" in capsys.readouterr().err


def test_the_swift_probe_on_an_engine_it_cannot_read_ends_the_run_with_exit_2(capsys):
    from lora_doctor.integrations.ms_swift import SwiftProbe

    trainer = types.SimpleNamespace(args=types.SimpleNamespace(use_vllm=True, vllm_mode="server"))
    with pytest.raises(SystemExit) as stopped:
        SwiftProbe(trainer)
    assert stopped.value.code == 2
    assert "needs --use_vllm true --vllm_mode colocate" in capsys.readouterr().err


def test_an_exit_2_inside_a_check_leaves_no_engine_log(tmp_path):
    # The engine started and the plan failed (bad input): the log of the engine's output, which the
    # one line does not name, is removed. The process gets a temporary folder of its own to look in.
    own_tmp = Path(tempfile.mkdtemp(prefix="exit-2-"))
    try:
        run = run_cli_process("check", CHECKPOINT, "--plan", f"{ROOT / 'tests' / 'bad_plans.py'}:raises", "--json", tmp_path / "r.json", env={"TMPDIR": str(own_tmp)})
        # Anything of lora-doctor's: the engine's log, its folder, the command's folder (torch's own
        # compile cache, which torch keeps in the temporary folder for every later process, is not).
        left = sorted(path.name for path in own_tmp.iterdir() if not path.name.startswith("torchinductor"))
    finally:
        shutil.rmtree(own_tmp, ignore_errors=True)
    assert_one_line_error(run, 2, "RuntimeError: boom", unwritten=tmp_path / "r.json")
    assert left == []


def test_a_check_stopped_by_sigterm_cleans_up_and_exits_143(tmp_path):
    # SIGTERM is how `timeout`, job schedulers and a cancelled CI run stop a command: its default action
    # left the command's folder (the engine's, vLLM's rendezvous file) and the engine's log behind.
    own_tmp = Path(tempfile.mkdtemp(prefix="term-"))
    share_compile_cache(own_tmp)  # warm kernels: the signal lands in lora-doctor's work, not in g++'s
    command = [sys.executable, "-m", "lora_doctor", "check", str(CHECKPOINT), "--json", str(tmp_path / "r.json")]
    process = subprocess.Popen(
        command, env=subprocess_env({"TMPDIR": str(own_tmp)}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not any(own_tmp.glob("ld-*/lde-*")):  # the engine is being built
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        left = sorted(path.name for path in own_tmp.iterdir() if path.name.startswith(("ld-", "lde-", "lora-doctor-", "vllm")))
    finally:
        kill_group(process)
        shutil.rmtree(own_tmp, ignore_errors=True)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["terminated"], stderr
    assert left == []
    assert not (tmp_path / "r.json").exists()
