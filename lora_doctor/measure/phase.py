"""The phase measurer `check` and `probe` share: one engine, after one sync phase, against the reference."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .. import catalog
from ..adapter.checkpoint import Checkpoint
from ..catalog import ADAPTER_NOT_REQUESTED, DECODE_DIVERGED, DIVERGED, MISSING, NON_FINITE, OK, PARTIAL, SCALED, STALE, STALE_CACHE
from ..engine.driver import Engine
from ..engine.worker_contract import layer_read, to_wire
from ..result import ModuleResult, PhaseResult, Sample
from .decode_path import base_route_kl, measure_decode
from .layer_figures import combine_layer_stats
from .logit_pass import CHUNK_POSITIONS, measure_logits, scale_range
from .metrics import greedy_match
from .noise import measure_resolution
from .prompts import engine_cache_blocks
from .reference import Reference
from .verdict import (
    decided_by,
    decode_verdict,
    describe_modules,
    finite,
    logit_verdict,
    merge_warning,
    module_verdict,
    refine_with_layers,
    resolution_note,
    scale_hint,
)

# The per-module figures a ModuleResult carries (layer_figures.module_figures).
MODULE_FIGURES = (
    "effective_scale", "residual", "divergence", "base_part", "slot_part", "base_residual",
    "slot_residual", "merge_kept", "merge_noise", "rounding", "delta_ratio",
)
NOT_READ_ZERO = "ΔW is zero (B = 0: an untrained adapter): there is nothing to compare"
NOT_READ_ABSENT = "the engine has no LoRA layer for it: vLLM does not apply this adapter's weights there"
# vLLM serves LoRA there (the engine wrapped the module: an LM head, an embedding, fused MoE experts)
# but the per-module read reads linear LoRA layers only; the logit figures include it.
NOT_READ_UNREADABLE = "vLLM applies this adapter's weights there ({layer}), but the per-module read cannot read that layer yet: the logit figures include it"
SAMPLES_PER_PHASE = 3

Progress = Callable[[str], None]


class PhaseMeasurer:
    """Measures an engine against the reference after a sync phase, streaming the prompts in chunks
    (see `logit_pass`). `check` and `probe` share it; `module_read` turns the per-module read on."""

    def __init__(
        self, reference: Reference, previous, tokenizer, texts, token_ids, max_new_tokens, thresholds, module_read: bool, *, chunk_positions: int = CHUNK_POSITIONS
    ):
        self.module_read = module_read
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
        self.eos = eos_ids(tokenizer, reference)
        self.reference_greedy = reference.greedy(token_ids, max_new_tokens, self.eos)

    def measure_noise(self, engine: Engine):
        """Fresh from disk and without an adapter, the engine must match the reference at α = 0:
        what it still differs by is this run's noise; the reference at α = 0, 1, 2 gives the signal."""
        base = measure_logits(self.reference, engine, self.token_ids, None, scale_range=self.scale_range, chunk_positions=self.chunk_positions)
        return measure_resolution(base.reference_kl, self.thresholds, noise_kl=base.kl_at[0.0])

    def __call__(self, engine: Engine, index: int, name: str, lora_request, say: Progress, adapters_loaded: bool | None = None) -> PhaseResult:
        """`adapters_loaded`: whether the plan left an adapter in the engine (None: ask the engine)."""
        clock = Stopwatch()
        # First, before any request of the measurement writes to the prefix cache: the rollouts' view.
        say(f"phase {index + 1} '{name}': the decode path (generating as the rollouts do)")
        decode = measure_decode(self.reference, engine, self.token_ids, self.max_new_tokens, lora_request, chunk_positions=self.chunk_positions)
        engine_greedy = decode.continuations
        clock.lap("decode")
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
        if self.resolution is None:
            self.resolution = measure_resolution(phase_logits.reference_kl, self.thresholds)
        resolution = self.resolution
        verdict = logit_verdict(logits.kl_mean, fit, resolution, self.thresholds)
        # The policy's LoRA changes no logit at any scale (B = 0: no optimizer step yet): every sync of
        # it serves W0 alike. Nothing to tell apart; the engine only has to compute the policy.
        zero_lora = resolution.signal_kl == 0.0 and finite(logits.kl_mean)
        kl_limit = resolution.kl_limit if resolution.resolves else None
        if zero_lora:
            # The smallest disagreement this run's noise would let the logits resolve.
            kl_limit = resolution.noise_kl * resolution.min_signal_to_noise
            verdict = OK if logits.kl_mean <= kl_limit else DIVERGED
        layers: list[ModuleResult] = []
        not_read: list[dict] = []
        if self.module_read:
            say(f"phase {index + 1} '{name}': reading what the engine holds, per module")
            layers, not_read = self.layer_results(engine, lora_request)
            if not zero_lora:
                verdict = refine_with_layers(verdict, [layer.verdict for layer in layers], complete=not not_read)
            clock.lap("layers")
        kl_previous = phase_logits.kl_previous
        if kl_previous is not None:
            if verdict != OK and self.matches_previous(engine, lora_request, kl_previous, layers):
                verdict = STALE
            clock.lap("previous")
        decode_no_cache = None
        if verdict == OK and resolution.resolves and decode.kl_mean > resolution.kl_limit:
            # Weights and prompt path agree, the rollouts do not: the same requests without the cache.
            say(f"phase {index + 1} '{name}': the decode path again, without reading the prefix cache")
            decode_no_cache = measure_decode(
                self.reference, engine, self.token_ids, self.max_new_tokens, lora_request, chunk_positions=self.chunk_positions, skip_cache=True
            ).kl_mean
            verdict = decode_verdict(decode.kl_mean, decode_no_cache, resolution.kl_limit)
            clock.lap("decode_no_cache")
        not_measured = {}
        cache_blocks = engine_cache_blocks(self.token_ids, engine.options)
        unjudged = stale_cache_unjudged(resolution, engine.options, cache_blocks)
        if unjudged and not zero_lora:
            not_measured[STALE_CACHE] = unjudged
        if verdict == MISSING and lora_request is None:
            if adapters_loaded is None:
                adapters_loaded = bool(engine.lora_enabled and engine.loaded_adapters())
            if adapters_loaded:
                verdict = ADAPTER_NOT_REQUESTED
        route_kl = None
        if lora_request is not None:
            say(f"phase {index + 1} '{name}': the base route (a request without the adapter)")
            route_kl = base_route_kl(self.reference, engine, self.token_ids)
            clock.lap("base_route")
        explanation = catalog.explanation(verdict)
        if zero_lora:
            held = (
                "the engine computes it"
                if verdict == OK
                else "yet the engine's outputs differ from it: the engine holds something other than W0"
            )
            explanation = (
                f"the policy's LoRA is zero (B = 0: no optimizer step yet), so every sync of it serves W0 alike; {held} "
                f"(KL {logits.kl_mean:.2e}); how the engine applies the LoRA is measurable from the first step on"
            )
        if verdict == SCALED:
            spec = self.reference.checkpoint.spec
            factor = fit.scale if resolution.resolves or not layers else median([layer.effective_scale for layer in layers])
            hint = scale_hint(factor, spec.r, spec.lora_alpha, spec.use_rslora)
            explanation = f"{explanation}: α = {factor:.3f}" + (f" {hint}" if hint else "")
        if verdict != OK and any(layer.verdict != OK for layer in layers):
            detail = describe_modules([(layer.module, layer.verdict) for layer in layers])
            explanation = f"{detail} — {explanation}" if verdict == PARTIAL else f"{explanation}; {detail}"
        note = None if zero_lora else resolution_note(resolution, fit, bool(layers))
        if note:
            explanation = f"{explanation} ({note})"
        kept = [layer.merge_kept for layer in layers if layer.merge_kept is not None]
        warnings = [merge_warning(layers, self.thresholds)]
        if resolution.resolves:
            # The base route is judged against W0 only where the engine's base holds W0: after a merged
            # sync the base itself differs (the per-module read's base part says so), not the route.
            merged_base = any(layer.base_part is not None and abs(layer.base_part) > self.thresholds.part_tolerance for layer in layers)
            warnings.append(path_warning(verdict, decode.kl_mean, None if merged_base else route_kl, resolution.kl_limit))
        warnings = [warning for warning in warnings if warning]
        return PhaseResult(
            index=index,
            name=name,
            with_adapter=lora_request is not None,
            verdict=verdict,
            explanation=explanation,
            # No scale explains NaN log-probs or NaN weights: the fit's minimum is then no figure.
            effective_scale=None if zero_lora or verdict == NON_FINITE or not finite(logits.kl_mean, fit.kl) else fit.scale,
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
            kl_limit=kl_limit,
            decided_by="logits" if zero_lora else decided_by(resolution, bool(layers)),
            merge_kept=sum(kept) / len(kept) if kept else None,
            warnings=warnings,
            modules_not_read=not_read,
            decode_kl_mean=decode.kl_mean,
            decode_kl_max=decode.kl_max,
            decode_logprob_diff_mean=decode.logprob_diff_mean,
            decode_logprob_diff_max=decode.logprob_diff_max,
            decode_positions=decode.positions,
            decode_kl_no_cache=decode_no_cache,
            decode_cache_blocks=cache_blocks,
            base_route_kl=route_kl,
            not_measured=not_measured,
        )

    def matches_previous(self, engine: Engine, lora_request, kl_previous: float, layers: list[ModuleResult]) -> bool:
        """Whether the engine holds the previous adapter state: by logits when they resolve the
        LoRA and, when read, by weights.

        Marks the modules that hold the previous ΔW as `stale`.
        """
        if self.resolution.resolves and kl_previous > self.resolution.kl_limit:
            return False
        if not layers:
            return self.resolution.resolves
        against_previous = {r.module: r for r in self.layer_results(engine, lora_request, self.previous)[0]}
        stale = [layer for layer in layers if against_previous.get(layer.module) and against_previous[layer.module].verdict == OK]
        for layer in stale:
            if layer.verdict != OK:
                layer.verdict = STALE
        return len(stale) == len(layers)

    def layer_results(self, engine: Engine, lora_request, adapter: Path | Checkpoint | None = None) -> tuple[list[ModuleResult], list[dict]]:
        """Per LoRA-targeted module, what the engine holds (base and adapter slot, read apart)
        against ΔW of `adapter` (the checkpoint's, another opened one, or an adapter folder); and the
        targeted modules it has no figures for, with the reason."""
        ckpt = self.reference.checkpoint
        lora_id = lora_request.lora_int_id if lora_request is not None else None
        request = layer_read(ckpt, adapter)
        per_rank = engine.rpc("lora_doctor_layer_stats", to_wire(request), lora_id)
        results = []
        zero = set()
        for figures in combine_layer_stats(per_rank):
            if figures["effective_scale"] is None:
                zero.add(figures["module"])
                continue
            layer = ModuleResult(**{key: figures[key] for key in MODULE_FIGURES}, module=figures["module"])
            layer.verdict = module_verdict(layer, self.thresholds)
            results.append(layer)
        read = {layer.module for layer in results}
        unread = sorted({ref.module for ref in request.factors.values()} - read)
        served = engine.rpc("lora_doctor_modules")[0]["modules"] if unread else {}
        names = ckpt.names if unread else None
        not_read = [{"module": module, "reason": NOT_READ_ZERO if module in zero else _not_read_reason(module, served, names)} for module in unread]
        order = self.reference.module_order
        return sorted(results, key=lambda layer: order.get(layer.module, len(order))), not_read

    def _samples(self, engine_greedy: list[list[int]]) -> list[Sample]:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        order = sorted(range(len(self.texts)), key=lambda i: self.reference_greedy[i] == engine_greedy[i])
        return [
            Sample(prompt=self.texts[i], reference=decode(self.reference_greedy[i]), engine=decode(engine_greedy[i]))
            for i in sorted(order[:SAMPLES_PER_PHASE])
        ]


def _not_read_reason(module: str, served: dict[str, str], names) -> str:
    """Why an adapter module has no per-module figures: the engine wrapped it with a LoRA layer the read
    cannot read (the module itself, or fused experts holding it), or it wrapped nothing there at all."""
    engine_name = names.engine_name(module)
    layer = served.get(engine_name) or next((cls for name, cls in served.items() if engine_name.startswith(f"{name}.")), None)
    return NOT_READ_ABSENT if layer is None else NOT_READ_UNREADABLE.format(layer=layer)


def stale_cache_unjudged(resolution, options: dict, cache_blocks: int) -> str | None:
    """Why this phase cannot tell rollouts reading stale KV blocks from healthy ones, if so: the
    decode path is judged only where the logits resolve the LoRA (a stale block moves the rollouts'
    log-probs by at most what the LoRA does) and where its requests can read a cached block at all.
    With prefix caching off there is no stale block to see."""
    if not options["enable_prefix_caching"]:
        return None
    if cache_blocks == 0:
        return (
            f"no prompt fills a {options['block_size']}-token KV block, so no rollout request read the prefix cache: "
            "use longer prompts (a shared system prompt and chat template) to check it"
        )
    if not resolution.resolves:
        return (
            f"the logits cannot resolve this LoRA at this precision (signal/noise {resolution.signal_to_noise:.1f} < "
            f"{resolution.min_signal_to_noise:g}): KV blocks of an earlier policy move the rollouts' log-probs by less "
            "than the run's noise, so a stale prefix cache cannot be told from a fresh one; check in float32 to see it"
        )
    return None


def path_warning(verdict: str, decode_kl: float, route_kl: float | None, kl_limit: float) -> str | None:
    """What the rollouts' paths show beside the verdict: a decode path that agrees where the prompt
    path does not (vLLM #51594: an lm_head LoRA dropped from prompt log-probs only), and a base
    route that is not W0 once an adapter is loaded (vLLM #42008, #49063)."""
    notes = []
    if verdict not in (OK, STALE_CACHE, DECODE_DIVERGED) and decode_kl <= kl_limit:
        notes.append(
            f"the decode path agrees (KL {decode_kl:.2e} ≤ {kl_limit:.2e}): the rollouts generate the checkpoint's "
            "policy; only the prompt log-probs (the path this verdict rests on) differ"
        )
    if route_kl is not None and route_kl > kl_limit:
        notes.append(
            f"the base route is not W0 (KL {route_kl:.2e} > {kl_limit:.2e}): a request without the adapter does not "
            "get the base model once an adapter is loaded"
        )
    return "; ".join(notes) or None


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class Stopwatch:
    """Wall time per step of a phase."""

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


def eos_ids(tokenizer, reference: Reference) -> set[int]:
    """The token ids that end a greedy continuation."""
    # A multimodal config keeps the language model's eos (and vocab, positions) on its text_config.
    ids = reference.model.config.get_text_config().eos_token_id
    ids = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
