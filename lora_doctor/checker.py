"""`check`: replay a trainer's sync plan into a real engine and compare it with the reference."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import defaults
from .adapter.checkpoint import Checkpoint, load_previous, open_checkpoint
from .adapter.dtypes import COMPUTE_DTYPES
from .engine.deadline import check_timeout
from .engine.driver import Engine, check_engine_options
from .engine.platform import (
    check_dtype,
    current_platform,
    default_dtype,
    device_memory,
    engine_device_bytes,
    quantization_problem,
)
from .engine.platform import reference_device as choose_reference_device
from .engine.sizing import check_parallel_fit, engine_config
from .environment import environment
from .errors import BadInput, out_of_memory_is_environment
from .measure.logit_pass import CHUNK_POSITIONS
from .measure.phase import PhaseMeasurer, Progress
from .measure.prompts import engine_cache_blocks, load_prompts, load_tokenizer, position_limit, tokenize
from .measure.reference import Reference
from .measure.verdict import FAIL, Thresholds, overall_verdict
from .plans.builtin import Plan, get_plan
from .plans.sync import Sync
from .preflight import ADAPTER_REFUSED, PreflightReport, inspect_checkpoint
from .random_state import preserves_random_state
from .result import PhaseResult, Report
from .version import __version__

# Pre-flight problems after which engine-vs-reference figures mean nothing, so the check stops
# before loading anything: NaN/Inf factors make both forwards NaN (any verdict would be noise);
# DoRA's ΔW is not scaling·B·A, so no per-module or scale figure applies; adapter modules the engine
# would match to none of its own (a name prefix it does not map) are silently not applied by vLLM,
# and PEFT refuses to load them, so there is no reference to compare with either.
BLOCKING_FINDINGS = frozenset({"nan_inf", "dora", "engine_name_mismatch"})


@preserves_random_state
@out_of_memory_is_environment("run the check")
def check(checkpoint: str | Path | Checkpoint, *, plan: str = defaults.PLAN, **options) -> Report:
    """Run `plan` on a real vLLM engine and measure it against HF + PEFT after every phase.

    `options` are those of `Checker`. Returns the report; raises `BadInput` (exit 2) or
    `EnvironmentProblem` (exit 3) when the check cannot be run at all.
    """
    validate_options(**{k: v for k, v in options.items() if k in _VALIDATED})
    chosen = get_plan(plan)
    # Before the reference and the engine are loaded: the plan cannot run without it.
    _require_previous(chosen, options.get("previous"))
    # Opened once (every field of its config validated, its files read once) and handed on.
    checkpoint = open_checkpoint(checkpoint, options.get("base"))
    preflight = inspect_checkpoint(checkpoint)
    untrained = preflight.by_code("untrained_adapter")
    if untrained:
        # Nothing to measure is no measured problem (1) and no healthy sync either (0): the input
        # cannot be checked, like any checkpoint that cannot be used (2).
        raise BadInput(
            f"nothing to measure in {checkpoint.adapter_dir}: every lora_B is zero (an untrained adapter: step 0, or a run that "
            f"never trained), so ΔW = 0 and every sync path serves the base alike; {untrained[0].fix}"
        )
    checkpoint.check_fits_base()
    blockers = measurement_blockers(preflight, chosen)
    if blockers:
        # Measuring an adapter the engine cannot hold meaningfully would only report garbage.
        dtype = options.get("dtype") or default_dtype(current_platform(), checkpoint.base().dtype or "float32")
        thresholds = options.get("thresholds") or Thresholds.for_dtype(dtype).override(options.get("threshold_overrides") or {})
        return stopped_report(checkpoint, chosen, preflight, blockers, thresholds, dtype)
    with Checker(checkpoint, preflight=preflight, **options) as checker:
        return checker.run(chosen)


_VALIDATED = ("dtype", "max_new_tokens", "tensor_parallel_size", "kv_cache_gib", "engine_timeout")


def validate_options(
    dtype: str | None = defaults.DTYPE,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    tensor_parallel_size: int = defaults.TENSOR_PARALLEL_SIZE,
    kv_cache_gib: int | None = defaults.KV_CACHE_GIB,
    engine_timeout: float = defaults.ENGINE_TIMEOUT,
) -> None:
    """Options that cannot work, refused before anything is read or loaded (dtype None: the default)."""
    check_timeout(engine_timeout)
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    if max_new_tokens < 1:
        raise BadInput("--max-new-tokens must be at least 1")
    if tensor_parallel_size < 1:
        raise BadInput("--tensor-parallel-size must be at least 1")
    if kv_cache_gib is not None and kv_cache_gib < 1:
        raise BadInput(f"--kv-cache-gib must be at least 1 (GiB of CPU KV cache), got {kv_cache_gib}")


def measurement_blockers(preflight: PreflightReport, plan: Plan | None = None) -> list:
    """Pre-flight problems that make the engine-vs-reference figures meaningless; for a plan that
    syncs the adapter, also those for which vLLM refuses to load it."""
    blocking = BLOCKING_FINDINGS | (ADAPTER_REFUSED if plan is not None and plan.adapter_sync else frozenset())
    return [finding for finding in preflight.problems if finding.code in blocking]


def stopped_report(ckpt: Checkpoint, plan: Plan, preflight: PreflightReport, blockers: list, thresholds: Thresholds | None, dtype: str) -> Report:
    """The report of a check stopped by the pre-flight: its findings, no phases, exit 1."""
    codes = ", ".join(sorted({finding.code for finding in blockers}))
    return Report(
        tool={"name": "lora-doctor", "version": __version__},
        environment=environment(),
        checkpoint=dict(ckpt.summary(), previous=None),
        plan={"name": plan.name, "summary": plan.summary, "phases": []},
        thresholds=(thresholds or Thresholds.for_dtype(dtype)).as_dict(),
        phases=[],
        verdict=FAIL,
        exit_code=1,
        preflight=[finding.to_dict() for finding in preflight.findings],
        stopped=f"the pre-flight found problems that make the measurement meaningless ({codes}); nothing was loaded"
        + (f" (plan {plan.name} syncs the adapter, which vLLM refuses)" if any(f.code in ADAPTER_REFUSED for f in blockers) else ""),
    )


class Checker:
    """A checkpoint, its reference and one engine, ready to replay any number of plans."""

    @preserves_random_state  # building the engine reseeds the process's generators
    def __init__(
        self,
        checkpoint: str | Path | Checkpoint,
        *,
        base: str | Path | None = None,
        previous: str | Path | Checkpoint | None = None,
        prompts: str | Path | list[str] | None = defaults.PROMPTS,
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        dtype: str | None = defaults.DTYPE,
        thresholds: Thresholds | None = None,
        threshold_overrides: dict[str, float] | None = None,
        tensor_parallel_size: int = defaults.TENSOR_PARALLEL_SIZE,
        kv_cache_gib: int | None = defaults.KV_CACHE_GIB,
        module_read: bool = defaults.MODULE_READ,
        chunk_positions: int = CHUNK_POSITIONS,
        progress: Progress | None = None,
        preflight: PreflightReport | None = None,
        engine_options: dict | None = None,
        reference_device: str = defaults.REFERENCE_DEVICE,
        engine_timeout: float = defaults.ENGINE_TIMEOUT,
    ):
        self.say = progress or (lambda _message: None)
        validate_options(
            dtype=dtype, max_new_tokens=max_new_tokens, tensor_parallel_size=tensor_parallel_size, kv_cache_gib=kv_cache_gib, engine_timeout=engine_timeout
        )
        if chunk_positions < 1:
            raise BadInput("chunk_positions must be at least 1")
        self.engine_options = dict(engine_options or {})
        if self.engine_options:
            check_engine_options(self.engine_options)
        # Opened once (a path is opened here, an opened `Checkpoint` is taken as it is) and handed on:
        # nothing below reads a file of the checkpoint or its base but through it.
        checkpoint = open_checkpoint(checkpoint, base)
        self.preflight = preflight or inspect_checkpoint(checkpoint)
        checkpoint.check_fits_base()
        self.checkpoint = checkpoint
        platform = current_platform()
        base_inventory = self.checkpoint.base()
        # A check computes in what the trainer's engine computes in, unless asked otherwise.
        dtype = dtype or default_dtype(platform, base_inventory.dtype or "float32")
        check_dtype(platform, dtype)
        choose_reference_device(platform, reference_device)  # a device that cannot be refused before anything loads
        quantized = quantization_problem(base_inventory.config, self.engine_options.get("quantization"))
        if quantized:
            raise BadInput(quantized)
        self.dtype = dtype
        check_parallel_fit(self.checkpoint, tensor_parallel_size)
        # The older adapter state must apply to the same base.
        self.previous = load_previous(previous, self.checkpoint) if previous is not None else None
        texts = load_prompts(prompts)
        try:
            self.thresholds = thresholds or Thresholds.for_dtype(dtype).override(threshold_overrides or {})
        except ValueError as error:
            raise BadInput(f"thresholds: {error}") from None
        # Before anything loads: a prompt the model cannot hold is the user's to shorten (exit 2).
        tokenizer = load_tokenizer(self.checkpoint)
        token_ids = tokenize(tokenizer, texts, self.checkpoint)
        limit = position_limit(self.checkpoint, token_ids, max_new_tokens)

        # Sized for every adapter the check loads that it knows of now (a custom plan's own folders
        # are checked against this rank when they are added).
        also_loaded = [self.previous] if self.previous is not None else []
        config = engine_config(self.checkpoint, limit, token_ids, max_new_tokens, dtype, tensor_parallel_size, kv_cache_gib, also_loaded)
        config = dataclasses.replace(config, options=self.engine_options)

        self.seconds: dict[str, float] = {}
        started = time.perf_counter()
        self.say("loading the reference (transformers + PEFT)")
        _total, free = device_memory(platform)
        engine_bytes = engine_device_bytes(config.weights_bytes, config.kv_cache_gib, config.kv_bytes_needed)  # what the engine will take
        device = choose_reference_device(platform, reference_device, device_free=free, engine_bytes=engine_bytes, reference_bytes=config.weights_bytes)
        self.reference = Reference(self.checkpoint, COMPUTE_DTYPES[dtype], device=device)
        if self.previous is not None:
            self.reference.load_previous(self.previous)
        self.measurer = PhaseMeasurer(
            self.reference, self.previous, tokenizer, texts, token_ids, max_new_tokens, self.thresholds, module_read, chunk_positions=chunk_positions
        )

        self.seconds["reference"] = time.perf_counter() - started

        started = time.perf_counter()
        self.say("starting the vLLM engine")
        self.token_ids, self.max_new_tokens = token_ids, max_new_tokens
        self.engine = Engine(self.checkpoint.base_dir, config, timeout=engine_timeout)
        try:
            self.seconds["engine_start"] = time.perf_counter() - started
            started = time.perf_counter()
            self.say("measuring the run's noise: the engine's base against the reference without the LoRA")
            self.measurer.resolution = self.measurer.measure_noise(self.engine)
            self.seconds["noise"] = time.perf_counter() - started
        except BaseException:
            self.engine.close()  # the caller never gets a Checker to close
            raise

    @preserves_random_state
    def run(self, plan: Plan | str) -> Report:
        """Replay one plan (a `Plan`, or a name `check --plan` takes) and judge every phase it probes."""
        if isinstance(plan, str):
            plan = get_plan(plan)
        _require_previous(plan, self.previous)
        self._close_sync()
        sync = Sync(self.engine, self.checkpoint, self.reference, self._measure, self.previous, self.token_ids, self.max_new_tokens)
        self._sync = sync
        started = time.perf_counter()
        plan.run(sync)
        seconds = dict(self.seconds, plan=time.perf_counter() - started)
        verdict = overall_verdict([p.verdict for p in sync.phases])
        return Report(
            tool={"name": "lora-doctor", "version": __version__},
            environment=dict(
                environment(),
                reference_device=self.reference.device.type,
                kv_cache_gib=self.engine.kv_cache_gib,
                tensor_parallel_size=self.engine.tensor_parallel_size,
            ),
            checkpoint=dict(
                self.checkpoint.summary(),
                previous=str(self.previous.adapter_dir) if self.previous is not None else None,
            ),
            plan={"name": plan.name, "summary": plan.summary, "phases": [p.name for p in sync.phases]},
            thresholds=self.thresholds.as_dict(),
            phases=sync.phases,
            verdict=verdict,
            exit_code=1 if verdict == FAIL else 0,
            seconds=seconds,
            preflight=[finding.to_dict() for finding in self.preflight.findings],
            resolution=self.measurer.resolution.as_dict(),
            engine=engine_summary(self.engine, self.engine_options, self.token_ids),
        )

    def _measure(self, name: str, lora_request, adapters_loaded: bool | None = None) -> PhaseResult:
        return self.measurer(self.engine, len(self._sync.phases), name, lora_request, self.say, adapters_loaded)

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            self._close_sync()

    def _close_sync(self) -> None:
        sync = getattr(self, "_sync", None)
        if sync is not None:
            sync.close()
            self._sync = None

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def engine_summary(engine: Engine, given: dict, token_ids: list[list[int]]) -> dict:
    """The engine's settings, the trainer's own (--engine-option), and whether the prompts reached its prefix cache."""
    options = engine.options
    blocks = engine_cache_blocks(token_ids, options)
    return {"options": options, "given": dict(given), "cache_blocks": blocks, "cache_exercised": blocks > 0}


def _require_previous(plan: Plan, previous) -> None:
    if plan.needs_previous and previous is None:
        raise BadInput(f"plan {plan.name} needs two states of the adapter: pass --previous <older checkpoint>")


