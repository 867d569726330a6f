"""TRL's `GRPOTrainer` with `use_vllm=True, vllm_mode="colocate"` (read from TRL 1.16's source).

What TRL does, and what the probe therefore uses:
- the engine is a `vllm.LLM` at `trainer.vllm_generation.llm`, built inside TRL with fixed
  arguments: `GRPOConfig` has no field for extra engine arguments, so `engine_options()` adds
  `max_logprobs=-1` (and lora-doctor's worker extension) while the trainer is built;
- a PEFT policy is synced by merge → push every base-named weight → unmerge; the engine has no LoRA
  enabled and generation passes no LoRA request;
- weights are synced when a generation batch is made: every `steps_per_generation × num_iterations`
  optimizer steps, starting with the first; `sync_weights` then calls `reset_prefix_cache()`, and
  the engine keeps vLLM's default prefix caching (on): the probe's rollouts read the cache as TRL's do;
- the probe uses the `lora_request` TRL's own `llm.generate` calls passed (recorded on the engine).

The watch (`add_watch`) reads what `_generate_and_score_completions` returns for every generation
batch: `sampling_per_token_logps` (the engine's log-probs of the sampled tokens, e),
`old_per_token_logps` (the policy's, t, computed with the weights just pushed; both there while
`vllm_importance_sampling_correction` is on, TRL's default) and `completion_mask`; the base's (b) is
`ref_per_token_logps` when `beta > 0` with a PEFT policy, no reference model and no "ref" adapter (the
adapter disabled), else one no-grad forward of the same batch with the adapter disabled.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from transformers import TrainerCallback

from .. import defaults
from ..callback import LoraDoctorCallback, log_figures
from ..engine.deadline import check_timeout
from ..engine.driver import WORKER_EXTENSION
from ..errors import BadInput
from ..live import RouteRecorder, probe_at_step
from ..watch import Watch
from .wrapping import AdapterSwitch, Wrapped, evented

# What `_generate_and_score_completions` may return beside the ids that a multimodal forward needs.
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "image_sizes", "token_type_ids", "mm_token_type_ids")


@contextmanager
def engine_options(*, worker_extension: bool = True):
    """Build TRL's colocated engine so that lora-doctor can measure it; wrap the trainer's construction.

    TRL constructs `vllm.LLM` in `trl.generation.vllm_generation`; for the duration of the block
    that name builds the same engine plus `max_logprobs=-1` (full-vocabulary log-probs) and, with
    `worker_extension`, lora-doctor's worker extension.
    """
    from trl.generation import vllm_generation

    build = vllm_generation.LLM
    extra = {"max_logprobs": -1}
    if worker_extension:
        extra["worker_extension_cls"] = WORKER_EXTENSION

    def build_for_lora_doctor(*args, **kwargs):
        return build(*args, **{**kwargs, **extra})

    vllm_generation.LLM = build_for_lora_doctor
    try:
        yield
    finally:
        vllm_generation.LLM = build


def add_probe(trainer, *, every_n_steps: int | None = None, engine_timeout: float = defaults.ENGINE_TIMEOUT, **options) -> LoraDoctorCallback:
    """Probe TRL's engine against the policy right after the syncs, through a callback on `trainer`.

    `every_n_steps` defaults to the sync cadence and must be a multiple of it (a probe between syncs
    would compare the engine with a policy that has moved since). `options` go to
    `LoraDoctorCallback` (prompts, stop_on_failure, ...). `engine_timeout`: the longest, in seconds,
    TRL's engine may make no progress on a probe's requests (see `lora_doctor.probe`).
    """
    args = trainer.args
    _needs_colocate(args, "probe")
    sync_every = args.steps_per_generation * args.num_iterations
    every = every_n_steps or sync_every
    if every % sync_every:
        raise BadInput(f"every_n_steps={every} is not a multiple of TRL's sync cadence (steps_per_generation × num_iterations = {sync_every})")
    callback = LoraDoctorCallback(
        trainer,
        lambda: trainer.vllm_generation.llm,
        lora_request=None,
        every_n_steps=every,
        route=lambda: RouteRecorder(trainer.vllm_generation.llm, "generate"),
        engine_timeout=engine_timeout,
        **options,
    )
    trainer.add_callback(callback)
    return callback


def add_watch(
    trainer,
    *,
    log_file=None,
    stop_on_failure: bool = defaults.STOP_ON_FAILURE,
    engine_timeout: float = defaults.ENGINE_TIMEOUT,
    prompts=None,
    calibration_steps: int = 3,
    base_every: int = 1,
    max_new_tokens: int = defaults.PROBE_MAX_NEW_TOKENS,
    module_read: bool = defaults.MODULE_READ,
) -> Watch:
    """Watch every generation batch of TRL's GRPO run; returns the `Watch` (its `records`, `probes`, `should_stop`).

    Each batch's engine and policy log-probs of the sampled tokens (and the base's) go to
    `Watch.observe` at the step they feed (`state.global_step + 1`, as the callback counts). The
    start-up probe runs on the first batch's engine; a flagged batch is probed at once, on its own
    prompts (`prompts`: these instead, e.g. a file of prompts that fill KV blocks) and the route
    TRL's rollouts named. Figures go through the trainer's logging; one JSON line per step to
    `log_file` (or LORA_DOCTOR_WATCH_LOG). With `stop_on_failure`, a probe that measured a failure
    stops training after that step.

    The base's log-probs are free with `beta > 0` when TRL made the LoRA from `peft_config` (its
    reference is then the policy with the adapter disabled); with `beta = 0` (TRL's default), or a
    `PeftModel` passed in (TRL's reference is then a frozen copy of its adapter, "ref", not the base),
    the watch runs that forward itself, no-grad, every `base_every` generation batches (α̂ is measured
    on those; the gap on every batch).

    With TRL's sleep mode the engine sleeps (level 2: its weights discarded) by the time a batch's
    log-probs exist: an escalation then sends no request (`unresolved`, the reason in the probe's
    `not_measured["engine"]`, as `probe` does for a sleeping engine) and the step's flag stands alone.
    """
    args = trainer.args
    _needs_colocate(args, "watch")
    if not getattr(args, "vllm_importance_sampling_correction", False):
        raise BadInput(
            "lora-doctor's TRL watch reads the engine's and the policy's log-probs TRL keeps for "
            "vllm_importance_sampling_correction=True (its default): it is off"
        )
    if not hasattr(trainer.accelerator.unwrap_model(trainer.model), "disable_adapter"):
        raise BadInput("lora-doctor's TRL watch needs a PEFT policy (a LoRA adapter on the base model)")
    if base_every < 1:
        raise BadInput(f"base_every must be at least 1, got {base_every}")
    callback = _WatchCallback(
        trainer,
        log_file=log_file,
        stop_on_failure=stop_on_failure,
        engine_timeout=check_timeout(engine_timeout, "engine_timeout"),
        prompts=prompts,
        calibration_steps=calibration_steps,
        base_every=base_every,
        probe_options={"max_new_tokens": max_new_tokens, "module_read": module_read},
    )
    trainer.add_callback(callback)
    return callback.watch


class _WatchCallback(TrainerCallback):
    """Puts the watch on TRL's generation, sync and wake while the run trains, and takes it off after."""

    def __init__(self, trainer, *, log_file, stop_on_failure, engine_timeout, prompts, calibration_steps, base_every, probe_options):
        self.trainer = trainer
        self.prompts = prompts
        self.base_every = base_every
        self.engine_timeout = engine_timeout
        self.probe_options = probe_options
        self._unlogged: dict[str, float] = {}
        llm = trainer.vllm_generation.llm
        model_config = llm.llm_engine.vllm_config.model_config
        self.watch = Watch(
            probe=self._probe,
            log_file=log_file,
            log=self._unlogged.update,
            stop_on_failure=stop_on_failure,
            calibration_steps=calibration_steps,
            logprobs_mode=str(getattr(model_config, "logprobs_mode", "") or "") or None,
            temperature=trainer.args.temperature,
        )
        self._batches = 0
        self._adapter = AdapterSwitch()
        self._recorder = None
        self._wrapped = Wrapped()

    # --- what the trainer calls ------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, generation = self.trainer, self.trainer.vllm_generation
        if state.global_step > 0:
            self.watch.event(state.global_step + 1, "resume")
        self._recorder = RouteRecorder(generation.llm, "generate")
        self._wrapped.wrap(trainer, "_generate_and_score_completions", self._generated)
        self._wrapped.wrap(generation, "sync_weights", evented(self.watch, trainer, "sync"))
        if hasattr(generation.llm, "wake_up"):
            self._wrapped.wrap(generation.llm, "wake_up", evented(self.watch, trainer, "wake"))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._unlogged:
            log_figures(self.trainer, control, dict(self._unlogged))
            self._unlogged.clear()
        if self.watch.should_stop:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._wrapped.restore()
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        return control

    # --- the watch's parts -----------------------------------------------------------------------

    def _generated(self, original):
        def generate_and_score(inputs):
            output = original(inputs)
            if self.trainer.model.training:
                self._observe(output)
            return output

        return generate_and_score

    def _observe(self, output: dict) -> None:
        step = self.trainer.state.global_step + 1
        # The step's own prompts as text, made only when a probe needs them (the start, a flagged step).
        texts = self.prompts if self.prompts is not None else lambda: _prompt_texts(self.trainer, output)
        if self._batches == 0:
            self.watch.start(step, texts)
        began = time.perf_counter()
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        base = self._base(output)
        self._batches += 1
        self.watch.observe(
            step,
            output["sampling_per_token_logps"],
            output["old_per_token_logps"],
            base,
            mask=mask,
            prompts=texts,
            base_seconds=time.perf_counter() - began,
        )

    def _base(self, output: dict):
        """The base's log-probs of the batch's completion tokens (None on batches `base_every` skips)."""
        trainer = self.trainer
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.beta != 0.0 and trainer.ref_model is None and "ref" not in peft_model.peft_config:
            return output["ref_per_token_logps"]  # TRL's reference: this policy, its adapter disabled
        if self._batches % self.base_every:
            return None
        import torch
        from trl.models.utils import disable_gradient_checkpointing

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        extra = {key: output[key] for key in _FORWARD_KEYS if key in output}
        with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs), self._adapter.off(peft_model):
            base, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attention, output["completion_ids"].size(1), batch_size=trainer.args.per_device_train_batch_size, **extra
            )
        return base

    def _probe(self, step: int, prompts):
        """The full probe on TRL's engine, the route its rollouts named, these prompts."""
        trainer = self.trainer
        result, _source = probe_at_step(
            trainer.vllm_generation.llm,
            trainer.accelerator.unwrap_model(trainer.model),
            step,
            recorder=self._recorder,
            given=lambda: None,  # TRL's rollouts name no adapter: it syncs merged weights
            what="the watch's probe",
            prompts=prompts,
            engine_timeout=self.engine_timeout,
            **self.probe_options,
        )
        return result


def _prompt_texts(trainer, output: dict) -> list[str]:
    """The batch's distinct prompts as text (TRL left-pads them; each is repeated per completion).

    The probe tokenizes them again: the text is the one that gives back the rollouts' own token ids
    (without the BOS the tokenizer adds again), so its requests read the same prefix-cache blocks.
    """
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    bos = tokenizer.bos_token
    texts = []
    for ids, mask in zip(output["prompt_ids"], output["prompt_mask"]):
        ids = ids[mask.bool()].tolist()
        text = tokenizer.decode(ids)
        if bos and text.startswith(bos) and tokenizer(text).input_ids != ids:
            text = text[len(bos) :]
        if text not in texts:
            texts.append(text)
    return texts


def _needs_colocate(args, what: str) -> None:
    if not getattr(args, "use_vllm", False) or args.vllm_mode != "colocate":
        raise BadInput(f"lora-doctor's TRL {what} needs GRPOConfig(use_vllm=True, vllm_mode='colocate'): it reads the trainer's own engine")
