"""`Watch`: every step of a run checked from the log-probs the trainer already has, and a full probe on
the step that breaks."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from . import figures as fig
from .calibration import Floor
from .limits import GAP_JUMP, MEASURABLE_BAND, MIN_FIT_TOKENS, SCALE_BAND_SIGMAS, SCALE_EXPLAINS
from .log import append, json_line, log_path


@dataclass
class WatchStep:
    """One observed step; `asdict()` is its JSON line."""

    step: int  # the optimizer step the rollouts feed (TRL: state.global_step + 1 while generated)
    alpha_hat: float | None  # effective LoRA scale from the sampled tokens; None while not measurable
    alpha_hat_uncertainty: float | None  # the band α̂ may leave 1 by: SCALE_BAND_SIGMAS standard errors
    logp_diff_mean: float  # mean |e - t| over the step's completion tokens
    logp_diff_max: float
    k3_kl: float  # k3 estimate of KL(engine || policy) over the completion tokens
    tokens: int
    flagged: bool
    reason: str | None  # why flagged / why not measurable / the input problem, one line
    input_problem: str | None  # NaN, zero-filled, positive log-probs, processed-vs-raw mode...
    probe_verdict: str | None  # set when a probe ran at this step (start-up or escalation)
    seconds: float  # the watch's own time this step (base forward included when it ran one)
    probe_seconds: float | None  # a probe's time this step (start-up probe included)
    events: list[str] = field(default_factory=list)  # "resume", "sync", "wake", "adapter_load", ...
    # The run's floor this step was judged against: the largest healthy gap (mean |e - t|) so far, and
    # the per-token noise (rms of e - t); 0 before the first healthy step.
    gap_floor: float = 0.0
    noise_rms: float = 0.0
    # rms per token of t - b (the LoRA's effect on the sampled tokens) and of the scale fit's residual.
    signal_rms: float | None = None
    residual_rms: float | None = None
    # The share of the engine's difference from the policy (‖e - t‖²) the fitted scale explains, and,
    # on a flagged step, whether it is under SCALE_EXPLAINS: whatever the engine computes then, it is
    # not the LoRA at some scale (a stale engine, a stale cache, a wrong route).
    scale_explains: float | None = None
    not_a_scale: bool = False
    # True once the run's floor was calibrated (the gap can be judged from then on).
    calibrated: bool = False


class Watch:
    """The sync between trainer and engine, checked at every step from the sampled tokens' log-probs.

    `observe` takes the engine's log-probs of the sampled tokens (e), the trainer's of the same tokens
    (t) and, when available, the base's (b: the adapter disabled). It computes the gap and α̂, learns
    the run's noise floor over the first `calibration_steps` healthy steps, flags a step whose α̂ leaves
    1 beyond its band or whose gap jumps past GAP_JUMP × the floor, and then calls `probe(step, prompts)`
    (the full probe on the trainer's engine) at once, so the verdict lands on the step that broke.

    `probe`: callable(step, prompts) -> PhaseResult | None, called by `start()` and on every flagged step.
    `log_file`: one JSON line per step (default: the LORA_DOCTOR_WATCH_LOG variable; none when unset).
    `log`: callable(dict[str, float]) for the trainer's logger. `should_stop` turns true with
    `stop_on_failure` once a probe measured a verdict that is not ok. `logprobs_mode` and `temperature`
    (the engine's): raw log-probs under a temperature other than 1 are not what the policy computes,
    and every step then names it as an input problem.
    """

    def __init__(
        self,
        *,
        probe=None,
        log_file=None,
        log=None,
        stop_on_failure: bool = True,
        calibration_steps: int = 3,
        logprobs_mode: str | None = None,
        temperature: float | None = None,
    ):
        if calibration_steps < 1:
            raise ValueError("calibration_steps must be at least 1")
        self.probe = probe
        self.log_path = log_path(log_file)
        self.log = log
        self.stop_on_failure = stop_on_failure
        self.floor = Floor(calibration_steps)
        self.records: list[WatchStep] = []
        self.probes: dict[int, object] = {}  # step -> the PhaseResult of a probe run at that step
        self.should_stop = False
        self._events: dict[int, list[str]] = defaultdict(list)
        self._startup: WatchStep | None = None
        self._mode_problem = _mode_problem(logprobs_mode, temperature)

    def start(self, step: int, prompts=None) -> WatchStep | None:
        """The start-up probe that confirms the engine before the floor is learned (None without `probe`).

        Its verdict and time go into the JSON line of the next observed step (usually the same step).
        """
        if self.probe is None:
            return None
        verdict, seconds = self._run_probe(step, prompts)
        nan = math.nan
        self._startup = WatchStep(
            step, None, None, nan, nan, nan, 0, False, "start-up probe", None, verdict, 0.0, seconds, ["start"], calibrated=False
        )
        return self._startup

    def event(self, step: int, kind: str) -> None:
        """Something that happened at `step` (resume, sync, wake, adapter_load, ...), kept in that step's line."""
        self._events[step].append(kind)

    def observe(self, step, engine_logprobs, policy_logprobs, base_logprobs=None, mask=None, prompts=None, base_seconds: float = 0.0) -> WatchStep:
        """Judge one step. Tensors [batch, tokens] (torch or numpy); `mask` 1 at completion tokens;
        `prompts` the step's prompts (text, or a callable returning them, called only when a probe
        runs) for an escalation probe; `base_seconds` the time an integration spent for the watch
        before this call (the base's forward), counted as the watch's own."""
        began = time.perf_counter()
        engine = fig.as_array(engine_logprobs)
        policy = fig.as_array(policy_logprobs)
        if policy.shape != engine.shape:
            raise ValueError(f"policy log-probs shape {policy.shape} differs from the engine's {engine.shape}")
        base = fig.as_array(base_logprobs) if base_logprobs is not None else None
        if base is not None and base.shape != engine.shape:
            raise ValueError(f"base log-probs shape {base.shape} differs from the engine's {engine.shape}")
        mask = fig.completion_mask(mask, engine.shape)

        problem = "; ".join(p for p in (self._mode_problem, fig.input_problem(engine, policy, base, mask)) if p) or None
        keep = fig.usable(engine, policy, base, mask)
        gap = fig.gap(engine, policy, keep)
        rounding = fig.resolution(engine, policy, keep, fig.relative_precision(engine_logprobs, policy_logprobs, base_logprobs))
        floor = self.floor
        record = WatchStep(
            step=int(step),
            alpha_hat=None,
            alpha_hat_uncertainty=None,
            logp_diff_mean=gap.mean,
            logp_diff_max=gap.max,
            k3_kl=gap.k3_kl,
            tokens=gap.tokens,
            flagged=False,
            reason=None,
            input_problem=problem,
            probe_verdict=None,
            seconds=0.0,
            probe_seconds=None,
            events=self._take_events(int(step)),
            gap_floor=floor.gap_mean,
            noise_rms=floor.noise_rms,
            calibrated=floor.calibrated,
        )
        if problem is not None:
            record.reason = f"measurement problem, not judged: {problem}"
        elif gap.tokens == 0:
            record.reason = "no completion tokens"
        else:
            self._judge(record, engine, policy, base, keep, gap, rounding)
        self._merge_startup(record)
        record.seconds = time.perf_counter() - began + base_seconds
        if record.flagged:
            verdict, seconds = self._run_probe(record.step, prompts)
            record.probe_verdict = verdict
            record.probe_seconds = (record.probe_seconds or 0.0) + seconds
        elif problem is None and gap.tokens:
            floor.learn(gap.mean, gap.rms)
        self.records.append(record)
        self._emit(record)
        return record

    def _judge(self, record: WatchStep, engine, policy, base, keep, gap: fig.Gap, rounding: float) -> None:
        """`rounding`: the per-token difference the inputs' own float rounding makes (`fig.resolution`),
        under which no residual, noise or gap floor is taken at its word."""
        floor = self.floor
        reasons = []
        if base is None:
            reasons.append("α̂ not measured: no base log-probs")
        else:
            fit = fig.scale_fit(engine, policy, base, keep, max(floor.noise_rms, rounding) or None)
            if fit is None:
                reasons.append("α̂ not measurable yet: the policy equals the base on these tokens (t = b)")
            elif fit.distinct_tokens < MIN_FIT_TOKENS:
                reasons.append(f"α̂ not measurable yet: {fit.distinct_tokens} distinct tokens, too few to estimate its band (at least {MIN_FIT_TOKENS})")
            else:
                record.signal_rms, record.residual_rms = fit.signal_rms, fit.residual_rms
                # The run's noise per token: its floor once it has one, else this step's own residual.
                noise = max(floor.noise_rms if floor.steps else fit.residual_rms, rounding)
                noise_band = SCALE_BAND_SIGMAS * noise / (fit.signal_rms * math.sqrt(gap.tokens)) if fit.signal_rms else math.inf
                if fit.signal_rms <= noise or noise_band > MEASURABLE_BAND:
                    reasons.append(
                        f"α̂ not measurable yet: t − b (rms {fit.signal_rms:.2g} per token) is within the run's noise "
                        f"({noise:.2g}; band from noise {noise_band:.2g} > {MEASURABLE_BAND})"
                    )
                else:
                    record.alpha_hat, record.alpha_hat_uncertainty = fit.alpha, fit.band
                    record.scale_explains = fit.explains
                    if abs(fit.alpha - 1.0) > fit.band:
                        record.flagged = True
                        reasons.append(f"α̂ = {fit.alpha:.3g} ± {fit.band:.2g} leaves 1")
        gap_floor = max(floor.gap_mean, rounding)
        if floor.calibrated and gap.mean > GAP_JUMP * gap_floor:
            record.flagged = True
            reasons.append(f"gap {gap.mean:.3g} jumped past {GAP_JUMP:g}× the run's floor {gap_floor:.3g}")
        elif not floor.calibrated:
            reasons.append(f"calibrating the gap's floor ({floor.steps} of {floor.calibration_steps} steps)")
        if record.flagged and record.scale_explains is not None and record.scale_explains < SCALE_EXPLAINS:
            record.not_a_scale = True
            reasons.append(f"not a scale: a scale of the LoRA explains {record.scale_explains:.0%} of the engine's difference from the policy")
        record.reason = "; ".join(reasons) or None

    def _run_probe(self, step: int, prompts) -> tuple[str | None, float]:
        if self.probe is None:
            return None, 0.0
        began = time.perf_counter()
        result = self.probe(step, prompts() if callable(prompts) else prompts)
        seconds = time.perf_counter() - began
        if result is None:
            return None, seconds
        self.probes[step] = result
        if self.stop_on_failure and result.failed:
            self.should_stop = True
        return result.verdict, seconds

    def _merge_startup(self, record: WatchStep) -> None:
        startup, self._startup = self._startup, None
        if startup is None:
            return
        record.probe_verdict = startup.probe_verdict
        record.probe_seconds = startup.probe_seconds
        record.events = [*startup.events, *record.events] if startup.step == record.step else [f"start@{startup.step}", *record.events]

    def _take_events(self, step: int) -> list[str]:
        events = []
        for at in sorted(s for s in self._events if s <= step):
            kinds = self._events.pop(at)
            events += kinds if at == step else [f"{kind}@{at}" for kind in kinds]
        return events

    def _emit(self, record: WatchStep) -> None:
        if self.log_path is not None:
            append(self.log_path, json_line(record))
        if self.log is not None:
            self.log(figures(record))


def figures(record: WatchStep) -> dict[str, float]:
    """Numbers for the trainer's logger (TensorBoard drops strings); α̂ only where it was measured."""
    out = {
        "lora_doctor/logp_diff_mean": record.logp_diff_mean,
        "lora_doctor/logp_diff_max": record.logp_diff_max,
        "lora_doctor/k3_kl": record.k3_kl,
        "lora_doctor/flagged": float(record.flagged),
        "lora_doctor/input_problem": float(record.input_problem is not None),
        "lora_doctor/watch_seconds": record.seconds,
    }
    if record.alpha_hat is not None:
        out["lora_doctor/alpha_hat"] = record.alpha_hat
        out["lora_doctor/alpha_hat_uncertainty"] = record.alpha_hat_uncertainty
    if record.probe_verdict is not None:
        out["lora_doctor/ok"] = float(record.probe_verdict == "ok")
        out["lora_doctor/probe_seconds"] = record.probe_seconds or 0.0
    return out


def _mode_problem(logprobs_mode: str | None, temperature: float | None) -> str | None:
    if logprobs_mode is None or temperature is None or temperature == 1.0:
        return None
    if logprobs_mode.startswith("raw"):
        return (
            f"the engine returns {logprobs_mode} at temperature {temperature:g}: its log-probs are of the unscaled "
            "distribution, the policy's of the sampled one (build the engine with logprobs_mode='processed_logprobs')"
        )
    return None
