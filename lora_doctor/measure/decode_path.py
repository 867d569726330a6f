"""The decode path: what the rollouts see. The engine generates from each prompt as a trainer's
rollouts do (on the phase's route, reading the prefix cache as the plan left it) and returns every
generated token's log-probs over the full vocabulary; the reference teacher-forces prompt + those
tokens. Prompt log-probs never read the prefix cache (vLLM skips it for them), so only this path
sees KV blocks computed by an earlier policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .logit_pass import FIT_CHECK_POSITIONS
from .metrics import kl_per_token


@dataclass
class DecodeFigures:
    """KL(reference ‖ engine) and |log-prob difference| of the generated tokens, over every prompt."""

    kl_mean: float
    kl_max: float
    logprob_diff_mean: float
    logprob_diff_max: float
    positions: int
    # The generated tokens of each prompt (the engine's greedy rollouts).
    continuations: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0


def decode_chunks(token_ids: list[list[int]], max_new_tokens: int, chunk_positions: int) -> list[list[int]]:
    """Consecutive prompt indices whose teacher-forced positions (prompt + at most `max_new_tokens`)
    fit in `chunk_positions` (a longer prompt is a chunk of its own): the reference's (positions ×
    vocab) tables live one chunk at a time, within the logit pass's own bound (docs/memory.md)."""
    chunks: list[list[int]] = []
    positions = chunk_positions
    for index, ids in enumerate(token_ids):
        forced = len(ids) + max_new_tokens
        if positions + forced > chunk_positions:
            chunks.append([])
            positions = 0
        chunks[-1].append(index)
        positions += forced
    return chunks


def measure_decode(reference, engine, token_ids: list[list[int]], max_new_tokens: int, lora_request, *, chunk_positions: int, skip_cache: bool = False) -> DecodeFigures:
    """Generate as the rollouts do and compare each generated token's log-probs with the reference's."""
    started = time.perf_counter()
    kl_sum = kl_max = diff_sum = diff_max = 0.0
    positions = 0
    continuations: list[list[int]] = []
    for chunk in decode_chunks(token_ids, max_new_tokens, chunk_positions):
        prompts = [token_ids[i] for i in chunk]
        generated = engine.decode(prompts, max_new_tokens, lora_request, skip_cache=skip_cache)
        forced = reference.continuation_logprobs(prompts, [tokens for tokens, _ in generated])
        for (tokens, engine_table), own in zip(generated, forced, strict=True):
            continuations.append(tokens)
            if not tokens:
                continue
            kl = kl_per_token(own, engine_table)
            picked = torch.tensor(tokens, dtype=torch.long)
            rows = torch.arange(len(tokens))
            diff = (own[rows, picked].double() - engine_table[rows, picked].double()).abs()
            kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
            diff_sum, diff_max = diff_sum + float(diff.sum()), max(diff_max, float(diff.max()))
            positions += len(tokens)
        del generated, forced
    count = max(positions, 1)
    return DecodeFigures(
        kl_mean=kl_sum / count,
        kl_max=kl_max,
        logprob_diff_mean=diff_sum / count,
        logprob_diff_max=diff_max,
        positions=positions,
        continuations=continuations,
        seconds=time.perf_counter() - started,
    )


def base_route_kl(reference, engine, token_ids: list[list[int]], positions: int = FIT_CHECK_POSITIONS) -> float:
    """Mean KL(W0 ‖ engine) over the first prompts (at least `positions` positions, whole prompts)
    requested without any adapter: once an adapter is loaded, a request that does not name it must
    still get the engine's base. A route either serves the base or not, so the first prompts tell
    it at a fraction of a phase's cost."""
    total, count = 0.0, 0
    for ids in token_ids:
        if count >= positions:
            break
        engine_table = engine.prompt_logprobs([ids], None)[0]
        own = reference.prompt_table(ids, 0.0)
        kl = kl_per_token(own, engine_table)
        total, count = total + float(kl.sum()), count + len(kl)
    return total / max(count, 1)
