"""No engine request without a deadline; a probe on a sleeping engine sends none.

A check whose engine stops making progress mid-plan ends with exit 3 within its --engine-timeout
(the request loop for an engine that keeps returning from its steps, the command's watchdog for a
step that never returns); a probe inside a trainer's process on a paused scheduler (what vLLM's
sleep mode does; the CPU build refuses sleep mode but pauses its scheduler) returns `unresolved`
with the reason at once, and a probe that times out leaves the trainer's engine generating the
same tokens, with none of lora-doctor's requests left in it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from conftest import BASE, CHECKPOINT, PROMPTS, assert_one_line_error, run_cli, run_cli_process

from lora_doctor import probe
from lora_doctor.engine.deadline import GRACE_SECONDS, EngineStalled
from lora_doctor.engine.driver import Engine

pytestmark = pytest.mark.slow  # builds engines of its own (`make test-quick` leaves it out)

STALLING_PLANS = "tests/stalling_plans.py"
# A timeout far below any real step of the fixture's engine (a few ms) and long enough to be told
# apart from "at once".
TIMEOUT = 4.0
# What the stalled check may take past its timeout: the abort, the engine's close, the renderers.
SLACK = 10.0
# The watchdog times one engine call: a step that compiles vLLM's CPU kernels on a cold compile cache
# takes ~10 s, which must not pass for a hang.
WATCHDOG_TIMEOUT = 15.0
PROMPT_IDS = [[85, 622, 315, 96, 374], [16, 519, 220, 16, 37]]  # the fixture's vocabulary has 704 tokens


def policy():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(CHECKPOINT))


def greedy_tokens(llm) -> list[list[int]]:
    """What the trainer's own rollouts generate (vllm.LLM.generate, greedy)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in PROMPT_IDS], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def requests_left(llm) -> int:
    """Requests the engine still holds: in its output processor and in its scheduler."""
    engine = llm.llm_engine
    return engine.get_num_unfinished_requests() + engine.engine_core.engine_core.scheduler.get_num_unfinished_requests()


def kept_log(line: str) -> Path:
    """The engine log an exit-3 line names (kept for the user: the test removes it)."""
    log = Path(line.split("(engine log: ")[1].rstrip(")"))
    assert log.name.startswith("lora-doctor-engine-") and log.is_file(), line
    return log


def test_a_check_whose_engine_stops_progressing_ends_with_exit_3_within_its_timeout(tmp_path):
    mark = tmp_path / "stalled-at"
    json_path = tmp_path / "report.json"
    run = run_cli(
        "check", CHECKPOINT, "--plan", f"{STALLING_PLANS}:engine_stops_after_adapter", "--engine-timeout", TIMEOUT, "--json", json_path,
        env={"LORA_DOCTOR_TEST_STALL_MARK": str(mark)},
    )
    stalled_for = time.monotonic() - float(mark.read_text())
    line = assert_one_line_error(run, 3, "the vLLM engine stalled", unwritten=json_path)
    assert f"engine timeout {TIMEOUT:g} s" in line and "aborted its requests" in line
    kept_log(line).unlink()
    print(f"stalled check: exit 3 {stalled_for:.1f} s after the engine stopped progressing: {line}")
    assert TIMEOUT <= stalled_for < TIMEOUT + SLACK, stalled_for


def test_the_watchdog_ends_a_check_whose_engine_step_never_returns(tmp_path):
    """A hang inside one step cannot be interrupted from Python: the command's watchdog ends it.
    (CLOCK_MONOTONIC is the machine's: the mark the check's process wrote reads here.)"""
    mark = tmp_path / "stalled-at"
    json_path = tmp_path / "report.json"
    run = run_cli_process("check", CHECKPOINT, "--plan", f"{STALLING_PLANS}:engine_step_never_returns", "--engine-timeout", WATCHDOG_TIMEOUT,
                          "--json", json_path, timeout=300, env={"LORA_DOCTOR_TEST_STALL_MARK": str(mark)})
    stalled_for = time.monotonic() - float(mark.read_text())
    line = assert_one_line_error(run, 3, "the vLLM engine stalled", unwritten=json_path)
    assert "has not returned after" in line and f"engine timeout {WATCHDOG_TIMEOUT:g} s" in line
    kept_log(line).unlink()
    print(f"hung step: exit 3 {stalled_for:.1f} s after the step began: {line}")
    assert WATCHDOG_TIMEOUT + GRACE_SECONDS <= stalled_for < WATCHDOG_TIMEOUT + GRACE_SECONDS + SLACK, stalled_for


def test_bad_engine_timeout_is_refused_before_anything_loads(tmp_path):
    json_path = tmp_path / "report.json"
    for value in ("0", "-1", "nan"):
        run = run_cli("check", CHECKPOINT, "--engine-timeout", value, "--json", json_path)
        assert_one_line_error(run, 2, "--engine-timeout must be a number of seconds above 0", unwritten=json_path)


def test_a_probe_on_a_paused_engine_returns_unresolved_at_once_and_the_engine_serves_after(user_llm):
    llm = user_llm
    before = greedy_tokens(llm)
    model = policy()
    core = llm.llm_engine.engine_core.engine_core
    core.pause_scheduler(mode="abort", clear_cache=True)
    try:
        started = time.monotonic()
        result = probe(llm, model, prompts=PROMPTS, engine_timeout=TIMEOUT)
        took = time.monotonic() - started
        assert requests_left(llm) == 0  # nothing was queued into the paused scheduler
    finally:
        core.resume_scheduler()
    assert took < TIMEOUT, took
    assert result.verdict == "unresolved" and not result.ok
    assert "asleep" in result.not_measured["engine"] and "no request was sent" in result.not_measured["engine"]
    assert math.isnan(result.kl_mean) and result.decided_by == "nothing"
    assert greedy_tokens(llm) == before


def test_a_probe_that_times_out_leaves_the_trainers_engine_serving(user_llm):
    llm = user_llm
    before = greedy_tokens(llm)
    model = policy()
    llm.llm_engine.step = lambda: []  # the engine stops making progress
    try:
        with pytest.raises(EngineStalled, match=f"engine timeout {TIMEOUT:g} s") as stalled:
            probe(llm, model, prompts=PROMPTS, engine_timeout=TIMEOUT)
    finally:
        del llm.llm_engine.step
    assert "aborted its requests" in str(stalled.value)
    assert requests_left(llm) == 0  # none of lora-doctor's requests reaches the trainer's next generate
    assert greedy_tokens(llm) == before


def test_the_trainers_requests_that_finish_meanwhile_are_handed_back(user_llm):
    """A trainer's request in flight when lora-doctor steps the engine is finished by those steps:
    its output reaches the trainer's own next wait, not lora-doctor."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = user_llm
    expected = greedy_tokens(llm)[0]
    llm.enqueue([TokensPrompt(prompt_token_ids=PROMPT_IDS[0])], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    Engine.attach(llm, timeout=TIMEOUT).greedy([PROMPT_IDS[1]], 8)
    outputs = llm.wait_for_completion(use_tqdm=False)
    assert [list(output.outputs[0].token_ids) for output in outputs] == [expected]
    assert requests_left(llm) == 0


def test_the_callback_on_a_sleeping_engine_logs_nothing_measured_and_training_goes_on(user_llm):
    """At `on_pre_optimizer_step` a sleep-mode trainer's engine sleeps: the probe is not measured, which
    is no failed sync (stop_on_failure does not stop the run)."""
    from transformers import TrainerControl, TrainerState

    from lora_doctor.callback import LoraDoctorCallback

    core = user_llm.llm_engine.engine_core.engine_core
    callback = LoraDoctorCallback(None, lambda: user_llm, prompts=PROMPTS, stop_on_failure=True, engine_timeout=TIMEOUT)
    control = TrainerControl()
    core.pause_scheduler(mode="abort", clear_cache=True)
    try:
        callback.on_pre_optimizer_step(None, TrainerState(), control, model=policy())
    finally:
        core.resume_scheduler()
    [result] = callback.results
    assert result.verdict == "unresolved" and "asleep" in result.not_measured["engine"]
    assert not control.should_training_stop


def test_the_callback_whose_probe_times_out_measures_nothing_and_the_engine_serves_on(user_llm):
    """Inside a trainer: the stalled probe's requests are aborted, the run goes on, the engine generates as before."""
    from transformers import TrainerControl, TrainerState

    from lora_doctor.callback import LoraDoctorCallback

    before = greedy_tokens(user_llm)
    callback = LoraDoctorCallback(None, lambda: user_llm, prompts=PROMPTS, stop_on_failure=True, engine_timeout=TIMEOUT)
    control = TrainerControl()
    user_llm.llm_engine.step = lambda: []
    try:
        with pytest.warns(UserWarning, match="measured nothing: the vLLM engine stalled"):
            callback.on_pre_optimizer_step(None, TrainerState(), control, model=policy())
    finally:
        del user_llm.llm_engine.step
    [result] = callback.results
    assert result.verdict == "unresolved" and "stalled" in result.not_measured["engine"]
    assert not control.should_training_stop
    assert requests_left(user_llm) == 0
    assert greedy_tokens(user_llm) == before
