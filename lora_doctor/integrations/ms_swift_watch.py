"""The watch on ms-swift's GRPO trainer (colocated vLLM), read from ms-swift 4.0.1 and 4.0.2's source.

Where the three log-probs of a step are (`swift/rlhf_trainers/grpo_trainer.py`, `_prepare_batch_inputs`,
called once per generation batch with the rollouts; it returns one encoded batch per
`steps_per_generation`, each with a `completion_mask`):
- e, the engine's log-probs of the sampled tokens: `rollout_per_token_logps`, kept only with
  `--log_rollout_offpolicy_metrics true` or `--rollout_importance_sampling_mode` (the watch turns the
  first on: it logs ms-swift's `rollout_correction/*` figures and, with `--off_policy_sequence_mask_delta`,
  makes that mask read the engine's log-probs, as ms-swift documents);
- t, the policy's: `old_per_token_logps`, always computed there, no-grad, before the step's update;
- b, the base's: `ref_per_token_logps` when `beta != 0` (ms-swift's GRPO default 0.04) with a LoRA
  policy and no ref adapter: ms-swift computes it in `null_ref_context`, the policy with its adapter
  disabled. Otherwise the watch runs that forward itself, no-grad, on every batch (its time is in the
  step's `seconds`).

ms-swift builds its colocated engine with `logprobs_mode='processed_logprobs'` and samples with
top-k 50 and top-p 0.9 by default: e is the log-prob under the kept tokens only, renormalised, while
t and b are over the whole vocabulary. The watch puts t and b on the engine's footing with the same
rule (vLLM's `apply_top_k_top_p`: sort, keep the top k, then the smallest top set of mass ≥ p), from
the logits ms-swift's own forward already computed (read where they are turned into log-probs); a
token the engine's filter left alone has a processed log-prob of exactly 0 whatever the weights, and
is left out where the policy's filter keeps it alone too. A repetition penalty is not mirrored (its
history is the engine's): the watch says so once and compares the log-probs as they are.

The sync events (`swift/rlhf_trainers/rollout_mixin.py`): `_move_full_model_to_vllm` pushes the
weights ("sync": merged with the LoRA, except in 4.0.2 with an adapter sync), `_move_adapter_to_vllm`
adds the adapter ("adapter_load"), the engine's `wake_up` ("wake", sleep mode); a run whose first
rollouts feed a step after the first was resumed ("resume").
"""

from __future__ import annotations

import copy
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

from ..watch import Watch
from .wrapping import AdapterSwitch, Wrapped, evented

# Positions whose kept mass is computed at a time: a [rows, vocab] float32 copy and its sort.
KEPT_MASS_ROWS = 256
# A processed log-prob this close to 0 is a token its filter kept alone (float32 rounding of 0).
ALONE = 1e-6
# The run's gap floor from its first observed step: the start-up probe has just confirmed the engine
# there, and ms-swift's resume bug (#8233) strikes at the second sync, where a floor still calibrating
# over the watch's default 3 steps would leave the gap unjudged. Unflagged steps raise the floor as
# the run goes; a healthy step flagged past it costs one probe (ok) and feeds no floor.
CALIBRATION_STEPS = 1
# The modules whose `selective_log_softmax` turns ms-swift's logits into log-probs (TRL's method,
# which ms-swift calls, and ms-swift's own forward).
LOG_SOFTMAX_MODULES = ("trl.trainer.grpo_trainer", "swift.rlhf_trainers.grpo_trainer")


def kept_log_mass(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """log of the probability mass vLLM's top-k / top-p filter keeps at each position ([..., vocab] → [...]).

    vLLM's rule (`vllm/v1/sample/ops/topk_topp_sampler.py`, `apply_top_k_top_p_pytorch`): logits sorted
    ascending, those under the k-th largest dropped, then those whose cumulative probability from the
    bottom stays ≤ 1 − p, the largest always kept. The processed log-prob of a kept token is its
    log-prob minus this.
    """
    vocab = logits.shape[-1]
    rows = logits.detach().reshape(-1, vocab)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], KEPT_MASS_ROWS):
        chunk = rows[start : start + KEPT_MASS_ROWS].float()
        kept, _ = chunk.sort(dim=-1)
        if top_k:
            threshold = kept[:, vocab - min(top_k, vocab)].unsqueeze(1)
            kept = kept.masked_fill(kept < threshold, -float("inf"))
        if top_p is not None and top_p < 1.0:
            below = kept.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
            below[:, -1] = False
            kept = kept.masked_fill(below, -float("inf"))
        out[start : start + chunk.shape[0]] = torch.logsumexp(kept, dim=-1) - torch.logsumexp(chunk, dim=-1)
    return out.reshape(logits.shape[:-1])


class Filter:
    """The engine's top-k / top-p, read from ms-swift's request config, and whether the watch mirrors it."""

    def __init__(self, request_config, logprobs_mode: str | None):
        top_k = getattr(request_config, "top_k", None)
        top_p = getattr(request_config, "top_p", None)
        self.top_k = top_k if top_k is not None and top_k > 0 else None
        self.top_p = top_p if top_p is not None and top_p < 1.0 else None
        penalty = getattr(request_config, "repetition_penalty", None)
        processed = logprobs_mode is not None and logprobs_mode.startswith("processed")
        self.active = processed and (self.top_k is not None or self.top_p is not None)
        self.note = None
        if processed and penalty not in (None, 1.0):
            self.note = (
                f"the engine's processed log-probs include repetition_penalty {penalty:g}, which the watch does not "
                "mirror on the policy's: its gap includes the penalty"
            )


class SwiftWatch:
    """Feeds ms-swift's per-step log-probs and sync events to a `Watch` while the run trains."""

    def __init__(self, trainer, *, probe, log, stop_on_failure: bool, notice, fail):
        """`notice(line)`: one line for the user; `fail(error)`: ends the run on an error of the watch's own
        (its exit code: 2/3 for lora-doctor's errors, 4 for a crash), never one of ms-swift's."""
        self.trainer = trainer
        self._probe, self._log, self._stop_on_failure, self._notice, self._fail = probe, log, stop_on_failure, notice, fail
        self._error: BaseException | None = None  # raised by the watch's part of a call into ms-swift
        self.watch: Watch | None = None
        self.filter: Filter | None = None
        self._wrapped = Wrapped()
        self._adapter = AdapterSwitch()
        self._started = False
        self._unprocessed_noted = False
        self._corrections: list | None = None  # (logps tensor, its kept log mass) of the batch being prepared
        self._chunks: list | None = None  # kept log masses of one log-prob computation, chunk by chunk
        self._seconds = 0.0  # the watch's own time inside ms-swift's calls this batch
        if trainer.rollout_importance_sampling_mode is None and not trainer.log_rollout_offpolicy_metrics:
            trainer.log_rollout_offpolicy_metrics = True
            notice(
                "lora-doctor watch: turned on --log_rollout_offpolicy_metrics (ms-swift keeps the engine's "
                "log-probs of the sampled tokens only then; it also logs its rollout_correction/* figures)"
            )

    def start(self) -> None:
        """Build the watch on the trainer's engine (it exists from the trainer's construction on) and put it on."""
        trainer = self.trainer
        model_config = getattr(getattr(trainer.engine.engine, "vllm_config", None), "model_config", None)
        logprobs_mode = str(getattr(model_config, "logprobs_mode", "") or "") or None
        self.filter = Filter(trainer.request_config, logprobs_mode)
        if self.filter.note:
            self._notice(f"lora-doctor watch: {self.filter.note}")
        self.watch = Watch(
            probe=self._probe,
            log=self._log,
            stop_on_failure=self._stop_on_failure,
            calibration_steps=CALIBRATION_STEPS,
            logprobs_mode=logprobs_mode,
            temperature=trainer.temperature,
        )
        if trainer.state.global_step > 0:
            self.watch.event(trainer.state.global_step + 1, "resume")
        self._wrapped.wrap(trainer, "_prepare_batch_inputs", self._prepared)
        self._wrapped.wrap(trainer, "_move_full_model_to_vllm", evented(self.watch, trainer, "sync"))
        self._wrapped.wrap(trainer, "_move_adapter_to_vllm", evented(self.watch, trainer, "adapter_load"))
        if hasattr(trainer.engine.engine, "wake_up"):
            self._wrapped.wrap(trainer.engine.engine, "wake_up", evented(self.watch, trainer, "wake"))

    def close(self) -> None:
        """Give every wrapped object its method back."""
        self._wrapped.restore()

    # --- wrappers --------------------------------------------------------------------------------

    def _prepared(self, original):
        def prepare_batch_inputs(inputs):
            if not self.trainer.model.training:
                return original(inputs)
            self._seconds, self._error = 0.0, None
            with self._kept_mass() if self.filter.active else nullcontext():
                batches = original(inputs)
                try:
                    base = self._base(batches)
                except Exception as error:
                    self._fail(error)
            if self._error is not None:
                self._fail(self._error)
            try:
                self._observe(inputs, batches, base)
            except Exception as error:
                self._fail(error)
            return batches

        return prepare_batch_inputs

    @contextmanager
    def _kept_mass(self):
        """While ms-swift prepares a batch: the kept log mass of every log-prob computation, keyed by its result."""
        trainer = self.trainer
        self._corrections = []
        modules = [sys.modules[name] for name in LOG_SOFTMAX_MODULES if name in sys.modules]
        originals = [module.selective_log_softmax for module in modules]

        def capturing(logits, index):
            logps = originals[0](logits, index)
            if self._chunks is not None and self._error is None:
                began = time.perf_counter()
                try:
                    self._chunks.append(kept_log_mass(logits, self.filter.top_k, self.filter.top_p))
                except Exception as error:  # ms-swift's step goes on; the watch ends the run after it
                    self._error = error
                self._seconds += time.perf_counter() - began
            return logps

        def logps_and_entropies(original):
            def computed(*args, **kwargs):
                self._chunks = []
                try:
                    logps, entropies = original(*args, **kwargs)
                finally:
                    chunks, self._chunks = self._chunks, None
                kept = torch.cat(chunks, dim=0) if chunks else None
                if kept is not None and kept.shape == logps.shape:
                    self._corrections.append((logps, kept))
                return logps, entropies

            return computed

        for module in modules:
            module.selective_log_softmax = capturing
        with self._wrapped.wrapping(trainer, "_get_per_token_logps_and_entropies", logps_and_entropies):
            yield
            for module, selective in zip(modules, originals):
                module.selective_log_softmax = selective

    def _base(self, batches: list) -> list:
        """Each batch's base log-probs: ms-swift's reference when it is the adapter-disabled policy, else a forward of the watch's own."""
        trainer = self.trainer
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if not hasattr(peft_model, "disable_adapter"):
            return [None] * len(batches)
        if trainer.beta != 0.0 and trainer.ref_model is None and not trainer.ref_adapter_name:
            return [batch["ref_per_token_logps"] for batch in batches]
        from swift.trainers import disable_gradient_checkpointing

        began = time.perf_counter()
        bases = []
        with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs), self._adapter.off(peft_model):
            for batch in batches:
                bases.append(trainer._get_per_token_logps_and_entropies(trainer.model, batch)[0])
        # The kept-mass time inside that forward is already in self._seconds.
        self._seconds += time.perf_counter() - began
        return bases

    # --- the step --------------------------------------------------------------------------------

    def _observe(self, inputs: list, batches: list, bases: list) -> None:
        trainer = self.trainer
        step = trainer.state.global_step + 1
        began = time.perf_counter()
        engine, policy, base, mask = [], [], [], []
        for batch, batch_base in zip(batches, bases):
            e = batch.get("rollout_per_token_logps")
            if e is None:
                continue  # ms-swift found the engine's log-probs incomplete for this batch and kept none
            t, b = batch["old_per_token_logps"], batch_base
            m = batch["completion_mask"].bool()
            if self.filter.active:
                t, b = self._processed(t), self._processed(b)
                # A token the engine's filter left alone reads 0 there whatever the weights: no measurement.
                m = m & ~((e == 0.0) & (t.abs() < ALONE))
            engine.append(e)
            policy.append(t)
            base.append(b)
            mask.append(m)
        if not engine:
            self._notice(f"lora-doctor watch: step {step} not observed: ms-swift kept no engine log-probs for its rollouts")
            return
        spent = time.perf_counter() - began
        if not self._started:
            self._started = True
            # The start-up probe on the configured prompts (None: the probe's own), after the first sync.
            self.watch.start(step, None)
        began = time.perf_counter()
        engine, policy, mask = _padded(engine), _padded(policy), _padded(mask)
        base = _padded(base) if all(b is not None for b in base) else None
        self.watch.observe(
            step,
            engine,
            policy,
            base,
            mask=mask,
            # Made into text only when a probe needs them.
            prompts=lambda: _prompt_texts(trainer, inputs),
            base_seconds=self._seconds + spent + time.perf_counter() - began,
        )

    def _processed(self, logps: torch.Tensor | None) -> torch.Tensor | None:
        """`logps` on the engine's footing: minus the log mass the engine's filter keeps, read from ms-swift's forward."""
        if logps is None:
            return None
        for computed, kept in self._corrections:
            if computed is logps:
                return logps - kept.to(logps.dtype)
        if not self._unprocessed_noted:
            self._unprocessed_noted = True
            self._notice(
                "lora-doctor watch: ms-swift's log-probs came in a layout the watch cannot match to its logits "
                "(padding-free or sequence-parallel batches): the engine's top-k/top-p log-probs are compared with "
                "the policy's as they are, and the gap includes the filter's mass"
            )
        return logps


def _padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Batches of different completion widths as one [rows, tokens] tensor, right-padded (mask 0 there)."""
    width = max(tensor.shape[1] for tensor in tensors)
    rows = [torch.nn.functional.pad(tensor.detach().float().cpu(), (0, width - tensor.shape[1])) for tensor in tensors]
    return torch.cat(rows, dim=0)


def _prompt_texts(trainer, inputs: list) -> list[str]:
    """The batch's distinct prompts as the engine read them (ms-swift's template; each is repeated per completion)."""
    texts = []
    for data in inputs:
        messages = copy.deepcopy(data["messages"][:-1])
        (text,) = trainer._apply_chat_template_to_messages_list([messages])
        if text not in texts:
            texts.append(text)
    return texts
