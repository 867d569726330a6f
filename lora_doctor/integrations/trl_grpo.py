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
"""

from __future__ import annotations

from contextlib import contextmanager

from .. import defaults
from ..callback import LoraDoctorCallback
from ..engine.driver import WORKER_EXTENSION
from ..errors import BadInput
from ..live import RouteRecorder


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
    if not getattr(args, "use_vllm", False) or args.vllm_mode != "colocate":
        raise BadInput("lora-doctor's TRL probe needs GRPOConfig(use_vllm=True, vllm_mode='colocate'): it reads the trainer's own engine")
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
