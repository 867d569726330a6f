"""A `transformers.TrainerCallback` that probes the trainer's own engine after its sync."""

from __future__ import annotations

from transformers import TrainerCallback

from .live import probe
from .result import PhaseResult


class LoraDoctorCallback(TrainerCallback):
    """Every `every_n_steps` optimizer steps, measure the rollout engine against the policy.

    It runs just before the optimizer step (`on_pre_optimizer_step`): rollouts for this step were
    generated after the trainer's sync, and the policy has not moved yet, so engine and model
    should agree. Figures go to the trainer's log history (`lora_doctor/kl_mean`,
    `lora_doctor/effective_scale`, `lora_doctor/ok`); with `stop_on_failure` a failed verdict stops
    training.

    `llm` and `lora_request` may be callables, read at every probe: trainers build their engine
    lazily and make a new LoRA request at every sync.
    """

    def __init__(
        self,
        llm,
        *,
        lora_request=None,
        every_n_steps: int = 1,
        prompts=None,
        tokenizer=None,
        base_dir=None,
        stop_on_failure: bool = True,
        max_new_tokens: int = 16,
    ):
        self.llm = llm
        self.lora_request = lora_request
        self.every_n_steps = every_n_steps
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.base_dir = base_dir
        self.stop_on_failure = stop_on_failure
        self.max_new_tokens = max_new_tokens
        self.results: list[PhaseResult] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1  # the step this optimizer update completes
        if model is None or step % self.every_n_steps:
            return control
        result = probe(
            _read(self.llm),
            model,
            lora_request=_read(self.lora_request),
            prompts=self.prompts,
            tokenizer=self.tokenizer,
            base_dir=self.base_dir,
            max_new_tokens=self.max_new_tokens,
            name=f"step-{step}",
        )
        self.results.append(result)
        state.log_history.append(
            {
                "step": step,
                "lora_doctor/kl_mean": result.kl_mean,
                "lora_doctor/effective_scale": result.effective_scale,
                "lora_doctor/ok": float(result.ok),
                "lora_doctor/verdict": result.verdict,
            }
        )
        if self.stop_on_failure and not result.ok:
            control.should_training_stop = True
        return control


def _read(value):
    return value() if callable(value) else value
