"""A `transformers.TrainerCallback` that probes the trainer's own engine after its sync."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from . import defaults
from .engine.deadline import check_timeout
from .live import probe_at_step
from .result import PhaseResult


class LoraDoctorCallback(TrainerCallback):
    """At the first optimizer step and every `every_n_steps` after, measure the rollout engine against the policy.

    It runs just before the optimizer step (`on_pre_optimizer_step`): rollouts for this step were
    generated after the trainer's sync, and the policy has not moved yet, so engine and model
    should agree. The figures (`lora_doctor/kl_mean`, `lora_doctor/effective_scale`,
    `lora_doctor/ok`, ...) go through the trainer's logging at the end of the step, so its log
    history and every configured logger (W&B, TensorBoard, ...) get them; with `stop_on_failure` a
    failed verdict stops training after that step.

    `llm` and `lora_request` may be callables, read at every probe: trainers build their engine
    lazily and make a new LoRA request at every sync. `lora_doctor.integrations` has ready-made
    ones for TRL and ms-swift. `route`, a callable returning a `live.RouteRecorder` installed on the
    trainer's engine (called once, at the first step), records the `lora_request` the trainer's own
    rollouts pass: once it has seen one, the probe uses it instead of `lora_request`, so a route the
    trainer got wrong is measured rather than assumed (`routes` keeps what each probe used).

    A probe of a sleeping engine sends no request, and one whose requests the engine left without
    progress for `engine_timeout` seconds aborts them (see `probe`): either measures nothing
    (`not_measured["engine"]` says why, with a warning for the stall) and does not stop training.
    """

    def __init__(
        self,
        trainer,
        llm,
        *,
        lora_request=None,
        every_n_steps: int = defaults.EVERY_N_STEPS,
        prompts=defaults.PROMPTS,
        tokenizer=None,
        base_dir=None,
        stop_on_failure: bool = defaults.STOP_ON_FAILURE,
        max_new_tokens: int = defaults.PROBE_MAX_NEW_TOKENS,
        module_read: bool = defaults.MODULE_READ,
        route=None,
        engine_timeout: float = defaults.ENGINE_TIMEOUT,
    ):
        self.trainer = trainer
        self.llm = llm
        self.lora_request = lora_request
        self.every_n_steps = every_n_steps
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.base_dir = base_dir
        self.stop_on_failure = stop_on_failure
        self.max_new_tokens = max_new_tokens
        self.module_read = module_read
        self.results: list[PhaseResult] = []
        self.route = route
        self.engine_timeout = check_timeout(engine_timeout, "engine_timeout")
        self._recorder = None
        # Per probe, where its lora_request came from: "the trainer's rollouts" or "given".
        self.routes: list[str] = []
        self._unlogged: dict[str, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.route is not None and self._recorder is None:
            self._recorder = self.route()  # before this step's rollouts
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1  # the step this optimizer update completes
        # Step 1, 1 + n, 1 + 2n, ...: the steps whose rollouts follow a sync when a trainer syncs every n steps.
        if model is None or (step - 1) % self.every_n_steps:
            return control
        result, source = probe_at_step(
            _read(self.llm),
            model,
            step,
            recorder=self._recorder,
            given=lambda: _read(self.lora_request),
            prompts=self.prompts,
            tokenizer=self.tokenizer,
            base_dir=self.base_dir,
            max_new_tokens=self.max_new_tokens,
            module_read=self.module_read,
            engine_timeout=self.engine_timeout,
        )
        self.routes.append(source)
        self.results.append(result)
        self._log(figures(result))
        if self.stop_on_failure and result.failed:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # The trainer's method as it found it: the recorder's wrapper goes with the run.
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        return control

    def _log(self, values: dict[str, float]) -> None:
        """Figures for the trainer's logging at the end of this step (a probe's, a watch's), merged with
        what this step has already given."""
        self._unlogged = {**(self._unlogged or {}), **values}

    def on_step_end(self, args, state, control, **kwargs):
        if self._unlogged is not None:
            log_figures(self.trainer, control, self._unlogged)
            self._unlogged = None
        return control


def log_figures(trainer, control, values: dict[str, float]) -> None:
    """`values` into the trainer's log history and every configured logger, from a callback's `on_step_end`.

    transformers' own `Trainer.log` (the log history plus every logger's `on_log`), called on the base
    class because trainers' overrides (TRL's, ms-swift's) flush their accumulated step metrics into
    whatever is logged. Its `on_log` clears `control.should_log`, which the trainer's own logging of
    this step waits for (TRL's `sampling/*`, the loss): it is put back as it was.
    """
    should_log = control.should_log
    Trainer.log(trainer, values)
    control.should_log = should_log


def figures(result: PhaseResult) -> dict[str, float]:
    """What a probe logs: numbers only (TensorBoard drops strings); the verdict is `results[i].verdict`."""
    return {
        "lora_doctor/ok": float(result.ok),
        "lora_doctor/effective_scale": result.effective_scale,
        "lora_doctor/kl_mean": result.kl_mean,
        "lora_doctor/kl_max": result.kl_max,
        "lora_doctor/top1_agreement": result.top1_agreement,
        "lora_doctor/greedy_match": result.greedy_match,
        "lora_doctor/layers_measured": float("layers" not in result.not_measured),
        # The decode path: what the rollouts see through the engine's prefix cache.
        "lora_doctor/decode_kl_mean": result.decode_kl_mean,
        "lora_doctor/decode_logprob_diff_max": result.decode_logprob_diff_max,
    }


def _read(value):
    return value() if callable(value) else value
