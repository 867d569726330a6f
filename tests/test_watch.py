"""The watch's math and judgement on synthetic log-probs (pure math: no engine; the real runs are in
test_watch_trl.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_doctor.result import PhaseResult
from lora_doctor.watch import Watch
from lora_doctor.watch.figures import gap, scale_fit
from lora_doctor.watch.limits import GAP_JUMP

BATCH, TOKENS = 4, 16
# A bf16 engine's noise on the sampled tokens' log-probs (the fixture run's healthy gap: 0.004–0.011).
NOISE = 0.005


def phase(verdict: str, **extra) -> PhaseResult:
    nan = float("nan")
    return PhaseResult(0, "probe", False, verdict, "", nan, nan, nan, nan, nan, nan, **extra)


def step_tensors(rng, scale: float = 1.0, lora: float = 0.3, noise: float = NOISE):
    """t, b and an engine applying the LoRA at `scale`: e = b + scale·(t − b) + noise."""
    base = -rng.gamma(2.0, 1.0, size=(BATCH, TOKENS))
    policy = np.minimum(base + rng.normal(0, lora, size=base.shape), -1e-4)
    engine = np.minimum(base + scale * (policy - base) + rng.normal(0, noise, size=base.shape), -1e-4)
    return engine, policy, base


class Probe:
    """The escalation: returns `verdict` and records what it was asked."""

    def __init__(self, verdict="ok", **extra):
        self.verdict, self.extra, self.calls = verdict, extra, []

    def __call__(self, step, prompts):
        self.calls.append((step, prompts))
        return phase(self.verdict, **self.extra)


def healthy_run(watch: Watch, rng, steps: int = 3):
    for step in range(1, steps + 1):
        watch.observe(step, *step_tensors(rng))


def test_healthy_steps_are_not_flagged_and_alpha_is_one():
    rng = np.random.default_rng(0)
    watch = Watch()
    healthy_run(watch, rng, 8)
    for record in watch.records:
        assert not record.flagged, record.reason
        assert abs(record.alpha_hat - 1.0) <= record.alpha_hat_uncertainty < 0.1
    assert watch.floor.calibrated and watch.floor.gap_mean == pytest.approx(NOISE * 0.8, rel=0.3)  # E|N(0,σ)| = 0.8σ


@pytest.mark.parametrize(("scale", "expected"), [(2.0, 2.0), (0.0, 0.0), (1.5, 1.5)])
def test_a_wrong_scale_is_flagged_and_escalated_at_once(scale, expected):
    rng = np.random.default_rng(1)
    probe = Probe("double_counted")
    watch = Watch(probe=probe)
    healthy_run(watch, rng)
    record = watch.observe(4, *step_tensors(rng, scale), prompts=["p1", "p2"])
    assert record.flagged and "leaves 1" in record.reason and not record.not_a_scale
    assert record.alpha_hat == pytest.approx(expected, abs=record.alpha_hat_uncertainty)
    assert probe.calls == [(4, ["p1", "p2"])]
    assert record.probe_verdict == "double_counted" and record.probe_seconds is not None
    assert watch.should_stop


def test_stop_on_failure_false_and_an_unmeasured_probe_do_not_stop():
    rng = np.random.default_rng(2)
    watch = Watch(probe=Probe("double_counted"), stop_on_failure=False)
    watch.observe(1, *step_tensors(rng, 2.0))
    assert watch.records[0].flagged and not watch.should_stop
    asleep = Watch(probe=Probe("unresolved", not_measured={"engine": "asleep"}))
    asleep.observe(1, *step_tensors(rng, 2.0))
    assert asleep.records[0].probe_verdict == "unresolved" and not asleep.should_stop


def test_a_fresh_adapter_is_not_measurable_yet():
    rng = np.random.default_rng(3)
    watch = Watch()
    engine, policy, _ = step_tensors(rng)
    record = watch.observe(1, engine, policy, policy.copy())  # B = 0: t = b
    assert record.alpha_hat is None and not record.flagged and "not measurable yet" in record.reason
    # A LoRA whose effect is within the noise: measurable neither.
    healthy_run(watch, rng)
    record = watch.observe(5, *step_tensors(rng, 2.0, lora=NOISE / 10))
    assert record.alpha_hat is None and not record.flagged and "within the run's noise" in record.reason


def test_a_gap_jump_past_the_floor_is_flagged_without_a_base():
    rng = np.random.default_rng(4)
    probe = Probe("stale")
    watch = Watch(probe=probe)
    for step in range(1, 4):
        engine, policy, _ = step_tensors(rng)
        record = watch.observe(step, engine, policy)
        assert not record.flagged and "no base log-probs" in record.reason
    assert watch.records[-1].calibrated is False and watch.floor.calibrated
    # Twice the healthy gap: the run's drift, not a jump.
    engine, policy, _ = step_tensors(rng, noise=2 * NOISE)
    assert not watch.observe(4, engine, policy).flagged
    engine, policy, _ = step_tensors(rng, noise=3 * GAP_JUMP * NOISE)
    record = watch.observe(5, engine, policy)
    assert record.flagged and "jumped past" in record.reason and probe.calls == [(5, None)]


def test_no_gap_flag_while_calibrating():
    rng = np.random.default_rng(5)
    watch = Watch(calibration_steps=3)
    engine, policy, _ = step_tensors(rng)
    watch.observe(1, engine, policy)
    engine, policy, _ = step_tensors(rng, noise=20 * NOISE)
    record = watch.observe(2, engine, policy)
    assert not record.flagged and "calibrating" in record.reason


def test_a_stale_engine_reads_not_a_scale():
    """The engine holds an older policy: its difference from the policy is no multiple of t − b."""
    rng = np.random.default_rng(6)
    probe = Probe("stale")
    watch = Watch(probe=probe)
    healthy_run(watch, rng)
    engine, policy, base = step_tensors(rng)
    moved = policy + rng.normal(0, 0.1, size=policy.shape)  # the policy moved; the engine did not follow
    record = watch.observe(4, engine, np.minimum(moved, -1e-4), base)
    assert record.flagged and record.not_a_scale and "not a scale" in record.reason
    assert record.probe_verdict == "stale"


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda e: np.where(np.arange(e.size).reshape(e.shape) % 7 == 0, np.nan, e), "not finite"),
        (lambda e: np.zeros_like(e), "zero-filled"),
        (lambda e: np.exp(e), "positive"),
    ],
)
def test_bad_engine_log_probs_are_an_input_problem_never_the_sync(damage, named):
    rng = np.random.default_rng(7)
    probe = Probe("double_counted")
    watch = Watch(probe=probe)
    healthy_run(watch, rng)
    engine, policy, base = step_tensors(rng, 2.0)
    record = watch.observe(4, damage(engine), policy, base)
    assert named in record.input_problem and record.reason.startswith("measurement problem")
    assert not record.flagged and record.alpha_hat is None and probe.calls == []
    # Nothing the watch learned comes from it.
    assert watch.floor.steps == 3


def test_raw_log_probs_under_a_temperature_are_named():
    rng = np.random.default_rng(8)
    watch = Watch(logprobs_mode="raw_logprobs", temperature=0.7)
    record = watch.observe(1, *step_tensors(rng))
    assert "raw_logprobs at temperature 0.7" in record.input_problem and not record.flagged
    assert Watch(logprobs_mode="processed_logprobs", temperature=0.7).observe(1, *step_tensors(rng)).input_problem is None


def test_the_mask_keeps_padding_out():
    rng = np.random.default_rng(9)
    engine, policy, base = step_tensors(rng)
    mask = np.ones_like(engine)
    mask[:, 10:] = 0
    engine[:, 10:] = 0.0  # padding: zeros and garbage outside the completion
    policy[:, 10:] = 5.0
    record = Watch().observe(1, engine, policy, base, mask=mask)
    assert record.input_problem is None and record.tokens == BATCH * 10
    assert record.logp_diff_mean == pytest.approx(np.abs(engine - policy)[:, :10].mean())


def test_torch_tensors_are_taken():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    e, t, b = (torch.tensor(a, dtype=torch.bfloat16) for a in step_tensors(rng))
    record = Watch().observe(1, e, t, b, mask=torch.ones(BATCH, TOKENS, dtype=torch.int64))
    assert record.tokens == BATCH * TOKENS and record.alpha_hat is not None


def test_gap_figures():
    engine = np.array([[-1.0, -2.0, -0.5]])
    policy = np.array([[-1.1, -2.0, -0.2]])
    figures = gap(engine, policy, np.ones_like(engine, dtype=bool))
    assert figures.mean == pytest.approx(0.4 / 3) and figures.max == pytest.approx(0.3)
    # k3 = exp(t − e) − 1 − (t − e), averaged.
    d = policy - engine
    assert figures.k3_kl == pytest.approx(float((np.expm1(d) - d).mean()))
    assert figures.k3_kl >= 0


def test_the_clustered_error_catches_errors_shared_by_a_completion():
    """A per-completion scale error (one sequence's tokens all off together) is invisible to the
    independent-token error, which shrinks with tokens; the clustered one keeps it."""
    rng = np.random.default_rng(11)
    base = -rng.gamma(2.0, 1.0, size=(BATCH, 256))
    policy = base + rng.normal(0, 0.3, size=base.shape)
    per_sequence = rng.normal(0, 0.2, size=(BATCH, 1))
    engine = base + (1 + per_sequence) * (policy - base)
    keep = np.ones_like(base, dtype=bool)
    fit = scale_fit(engine, policy, base, keep)
    x, r = policy - base, engine - base - fit.alpha * (policy - base)
    independent = np.sqrt((r**2).sum() / (r.size - 1) / (x**2).sum())
    assert fit.standard_error > 5 * independent
    assert abs(fit.alpha - 1.0) <= fit.band


def test_json_lines_events_and_the_startup_probe(tmp_path, monkeypatch):
    path = tmp_path / "watch.jsonl"
    monkeypatch.setenv("LORA_DOCTOR_WATCH_LOG", str(path))
    logged = []
    rng = np.random.default_rng(12)
    probe = Probe("ok")
    watch = Watch(probe=probe, log=logged.append)
    assert watch.start(1, ["a"]).probe_verdict == "ok"
    watch.event(1, "sync")
    watch.observe(1, *step_tensors(rng))
    watch.event(2, "wake")
    watch.event(3, "sync")
    watch.observe(3, *step_tensors(rng, 2.0))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 3]
    first, second = lines
    assert first["probe_verdict"] == "ok" and first["probe_seconds"] >= 0 and first["events"] == ["start", "sync"]
    assert first["alpha_hat"] is not None and first["flagged"] is False and first["seconds"] >= 0
    assert second["events"] == ["wake@2", "sync"] and second["flagged"] and second["probe_verdict"] == "ok"
    assert {"step", "alpha_hat", "logp_diff_mean", "flagged", "probe_verdict", "seconds", "probe_seconds"} <= set(first)
    assert all(isinstance(value, float) for entry in logged for value in entry.values())
    assert logged[1]["lora_doctor/flagged"] == 1.0 and "lora_doctor/alpha_hat" in logged[0]
    # A flag the probe found healthy does not stop the run, and does not feed the floor either.
    assert not watch.should_stop and watch.floor.steps == 1


def test_not_finite_figures_are_null_in_the_json_line(tmp_path):
    path = tmp_path / "w.jsonl"
    watch = Watch(log_file=path)
    engine = np.full((1, 4), np.nan)
    watch.observe(1, engine, np.full((1, 4), -1.0))
    (line,) = path.read_text().splitlines()
    data = json.loads(line)
    assert data["logp_diff_mean"] is None and "not finite" in data["input_problem"]


def test_a_failed_startup_probe_stops_and_prompts_are_made_only_for_a_probe():
    rng = np.random.default_rng(13)
    made = []

    def prompts():
        made.append(1)
        return ["p"]

    probe = Probe("double_counted")
    watch = Watch(probe=probe)
    watch.observe(1, *step_tensors(rng), prompts=prompts)
    assert made == [] and probe.calls == []  # healthy step: no probe, the prompts never made
    assert watch.start(2, ["s"]).probe_verdict == "double_counted" and watch.should_stop
    record = watch.observe(2, *step_tensors(rng, 2.0), prompts=prompts)
    assert made == [1] and probe.calls == [(2, ["s"]), (2, ["p"])]
    assert record.events == ["start"] and record.probe_verdict == "double_counted"
    assert Watch().start(1) is None  # no probe: nothing to start


def test_a_fit_on_a_few_tokens_is_not_judged_and_a_floor_is_never_under_the_rounding():
    # ms-swift's first step after a resume: two identical one-token completions, the engine and the
    # policy in float32 agreeing to their last bits. The fit's residual is ~1e-15 and α̂ = 1 + 3e-8:
    # a band from that residual (6e-16) flagged it and kept the run's floor from ever calibrating.
    import torch

    base = torch.tensor([[-3.25], [-3.25]], dtype=torch.float32)
    policy = torch.tensor([[-2.0625], [-2.0625]], dtype=torch.float32)
    engine = torch.nextafter(policy, torch.tensor(0.0))  # one float32 ulp from the policy
    watch = Watch(calibration_steps=1)
    record = watch.observe(1, engine, policy, base)
    assert not record.flagged and record.alpha_hat is None and "1 distinct tokens" in record.reason
    assert watch.floor.calibrated
    # The next step's double count is flagged by its gap, against a floor that did calibrate.
    record = watch.observe(2, base + 2 * (policy - base), policy, base)
    assert record.flagged and "jumped past" in record.reason
    # A healthy float32 gap of one ulp the other way stays under the floor float32's rounding sets,
    # however small the learned one (here one ulp).
    assert not watch.observe(3, torch.nextafter(policy, torch.tensor(-10.0)), policy, base).flagged
    # With enough distinct tokens α̂ is judged, and its band is never under the rounding: an engine
    # one ulp off the policy on every token is a scale of 1.
    rng = np.random.default_rng(4)
    base = torch.tensor(-rng.gamma(2.0, 1.0, size=(BATCH, TOKENS)), dtype=torch.float32)
    policy = torch.clamp(base + torch.tensor(rng.normal(0, 0.3, size=(BATCH, TOKENS)), dtype=torch.float32), max=-1e-2)
    record = Watch().observe(1, torch.nextafter(policy, torch.tensor(0.0)), policy, base)
    assert not record.flagged and record.alpha_hat == pytest.approx(1.0, abs=1e-5), record.reason


def test_the_wrapped_methods_are_given_back():
    from lora_doctor.integrations.wrapping import Wrapped, evented

    class Engine:
        def wake_up(self):
            return "woke"

    class Trainer:
        class state:
            global_step = 6

    engine, trainer, watch = Engine(), Trainer(), Watch()
    own = lambda: "own"  # noqa: E731 (an attribute of the instance itself, not the class's method)
    other = Engine()
    other.wake_up = own
    wrapped = Wrapped()
    wrapped.wrap(engine, "wake_up", evented(watch, trainer, "wake"))
    wrapped.wrap(other, "wake_up", evented(watch, trainer, "wake"))
    with wrapped.wrapping(engine, "wake_up", lambda original: lambda: "inside"):
        assert engine.wake_up() == "inside"
    assert engine.wake_up() == "woke" and other.wake_up() == "own"  # recorded, then the call itself
    assert watch.observe(7, *step_tensors(np.random.default_rng(5))).events == ["wake", "wake"]
    wrapped.restore()
    assert "wake_up" not in vars(engine) and engine.wake_up() == "woke" and other.wake_up is own


def test_the_adapter_switch_gives_the_bases_log_probs_as_peft_does():
    # The base forward of both trainers' watches: the LoRA layers switched off directly, not through
    # PEFT's disable_adapter (a walk of the model per layer); the same logits, and the adapter back on.
    import torch
    from conftest import BASE, CHECKPOINT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_doctor.integrations.wrapping import AdapterSwitch

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(CHECKPOINT))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        policy = model(ids).logits
        with model.disable_adapter():
            expected = model(ids).logits
        switch = AdapterSwitch()
        for _ in range(2):  # the layers found once, then reused
            with switch.off(model):
                assert torch.equal(model(ids).logits, expected)
            assert torch.equal(model(ids).logits, policy)
    assert not torch.equal(policy, expected)
