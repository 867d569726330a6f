"""One phase's logit figures, streamed over chunks of prompts so memory does not grow with them.

A (positions × vocab) float32 table is 2.4 GB at 4k positions and a 151,936-token vocabulary, so no
table outlives its chunk of prompts. Pass 1 takes the engine's tables a chunk at a time (one batch of
requests) and the reference's at α = 0, 1, 2 a prompt at a time, and keeps only per-token sums
(`metrics.NodeTally`). The scale fit works on the first
prompts (≥ FIT_CHECK_POSITIONS positions): their engine tables go to a temporary file when there is
more than one chunk, and a fit that needs the reference at another α reads them back, one chunk at a
time, instead of asking the engine again. (Spilling every prompt's tables wrote 5 GB at 8k positions
and made the whole pass grow faster than the prompts.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import (
    NODE_SLOPES,
    SLOPE_STEP,
    LogitComparison,
    Node,
    NodeTally,
    ScaleFit,
    TokenTally,
    fit_scale,
    kl_per_token,
    node_slope,
    tangent_minimum,
)
from .reference import PREVIOUS_ADAPTER

# Prompt positions per chunk: the engine's requests of a chunk go as one batch. A phase's peak holds
# the engine's (chunk × vocab) float32 tables plus four of the longest prompt (the reference's three
# and a slope; measured: +1.0 GB at ~420-position chunks, a 151,936-token vocabulary and ~212-token
# prompts); larger chunks save little time, small vocabularies fit every prompt in one.
CHUNK_POSITIONS = 512
# Positions the fit's Gauss-Newton steps look at (the first prompts, whole): when the engine is the
# reference at some α every token has its minimum there, so a sample finds it.
FIT_SAMPLE_POSITIONS = 128
# Positions the α the steps end at is judged on, against the nodes (the first prompts, whole): the
# fitted α and `kl_at_scale` come from them. Over every prompt this one forward cost a quarter of a
# phase at 4k positions (the fit then took 25–32% of the phases' time); the objective at the nodes
# over every prompt stays in `kl_at`.
FIT_CHECK_POSITIONS = 512
# Positions the tangent's minimum is found on (the sample's first rows): its Newton iterations (5–7
# measured) pass over these tables several times, and every token has its minimum at the engine's α.
TANGENT_POSITIONS = 128


@dataclass
class PhaseLogits:
    """What the logits say about one phase; every KL is KL(reference ‖ engine) per token, averaged."""

    comparison: LogitComparison  # the reference at α = 1 against the engine
    fit: ScaleFit  # its kl: over the first prompts (≥ FIT_CHECK_POSITIONS positions, or every prompt)
    # The fit objective at the nodes α = 0, 1, 2: mean KL(reference@α ‖ engine) over every prompt.
    kl_at: dict[float, float]
    # Mean KL(reference@1 ‖ reference@α) for α = 0 and 2: how far the LoRA moves the logits.
    reference_kl: dict[float, float]
    kl_previous: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def prompt_chunks(token_ids: list[list[int]], chunk_positions: int = CHUNK_POSITIONS) -> list[list[int]]:
    """Consecutive prompt indices grouped so that each group has at most `chunk_positions` scored
    positions (a longer prompt is a chunk of its own)."""
    chunks: list[list[int]] = [[]]
    positions = 0
    for index, ids in enumerate(token_ids):
        scored = max(len(ids) - 1, 0)
        if chunks[-1] and positions + scored > chunk_positions:
            chunks.append([])
            positions = 0
        chunks[-1].append(index)
        positions += scored
    return chunks if chunks[0] else []


def scale_range(r: int, scaling: float) -> tuple[float, float]:
    """The α the fit searches: from −1 (ΔW subtracted) to past every scale a known confusion gives —
    2 (double count), sqrt(r) (plain LoRA scaled as rsLoRA, r ≤ 256), scaling and 1/scaling."""
    known = [2.0, math.sqrt(min(r, 256)), scaling, 1 / scaling if scaling else 0.0]
    return -1.0, 1.25 * max(known)


def measure_logits(
    reference,
    engine,
    token_ids: list[list[int]],
    lora_request,
    *,
    scale_range: tuple[float, float],
    previous: bool = False,
    chunk_positions: int = CHUNK_POSITIONS,
) -> PhaseLogits:
    """Compare the engine with the reference over every prompt, chunk by chunk, and fit α."""
    seconds = {"engine": 0.0, "reference": 0.0, "scale_fit": 0.0}
    chunks = [[token_ids[i] for i in chunk] for chunk in prompt_chunks(token_ids, chunk_positions)]
    tokens = TokenTally()
    nodes = {alpha: NodeTally() for alpha in NODE_SLOPES}
    sample: dict[float, NodeTally] | None = None  # the nodes over the fit's sample: the first prompts
    sample_count = len(token_ids)
    check: dict[float, NodeTally] | None = None  # the nodes over the first prompts the fitted α is judged on
    check_count = len(token_ids)
    reference_kl = {0.0: 0.0, 2.0: 0.0}
    previous_kl = []
    with _EngineTables(spill=len(chunks) > 1) as stored:
        for ids in chunks:
            started = time.perf_counter()
            engine_tables = engine.prompt_logprobs(ids, lora_request)
            seconds["engine"] += time.perf_counter() - started
            if check is None:  # the fit reads back the first prompts only: up to those it is judged on
                stored.add(engine_tables)

            started = time.perf_counter()
            # The reference goes prompt by prompt (it runs one prompt per forward anyway): its three
            # tables are one prompt's, not the chunk's, beside the engine's tables of the chunk.
            for prompt, table in zip(ids, engine_tables, strict=True):
                tables = [reference.prompt_table(prompt, alpha) for alpha in NODE_SLOPES]
                for alpha, own in zip(NODE_SLOPES, tables, strict=True):
                    kl = nodes[alpha].add(table, own, node_slope(alpha, tables))
                    if alpha == 1.0:
                        tokens.add(own, table, kl)
                for alpha in reference_kl:
                    reference_kl[alpha] += float(kl_per_token(tables[1], tables[int(alpha)]).sum())
                del tables, own
                if previous:
                    previous_kl.append(kl_per_token(reference.prompt_table(prompt, 1.0, PREVIOUS_ADAPTER), table))
                if sample is None and nodes[1.0].tokens >= FIT_SAMPLE_POSITIONS:
                    sample = {alpha: copy.copy(tally) for alpha, tally in nodes.items()}
                    sample_count = tokens.prompts
                if check is None and nodes[1.0].tokens >= FIT_CHECK_POSITIONS:
                    check = {alpha: copy.copy(tally) for alpha, tally in nodes.items()}
                    check_count = tokens.prompts
            del engine_tables, table
            seconds["reference"] += time.perf_counter() - started

        sample, check = sample or nodes, check or nodes

        def first_prompts(count: int):
            """(prompts, the engine's tables) of the first `count` prompts, chunk by chunk: read back."""
            for chunk, ids in enumerate(chunks):
                if count <= 0:
                    return
                yield ids[:count], stored.first(chunk, count)
                count -= len(ids)

        def measure(alpha: float) -> Node:
            """The objective, its slope and the tangent's minimum at a new α over the sample."""
            tally, tangent = NodeTally(higher=True), []
            for ids, engine_tables in first_prompts(sample_count):
                for prompt, table in zip(ids, engine_tables, strict=True):
                    at_alpha = reference.prompt_table(prompt, alpha)
                    at_ahead = reference.prompt_table(prompt, alpha + SLOPE_STEP)
                    slope = (at_ahead - at_alpha) / SLOPE_STEP
                    tally.add(table, at_alpha, slope)
                    # The tangent at the midpoint, where the difference is the slope to second order.
                    room = TANGENT_POSITIONS - sum(len(t[0]) for t in tangent)
                    if room > 0:
                        # Copies: a view would keep the prompt's whole table alive through the steps.
                        tangent.append((table[:room].clone(), at_alpha[:room].add(at_ahead[:room]).div_(2), slope[:room].clone()))
                    del at_alpha, at_ahead, slope
            node, middle = tally.node(), alpha + SLOPE_STEP / 2
            step = tangent_minimum(tangent, scale_range[0] - middle, scale_range[1] - middle)
            return dataclasses.replace(node, step=step + SLOPE_STEP / 2)

        def kl_at(alpha: float) -> float:
            """The objective at a new α over the prompts the fitted α is judged on."""
            total, count = 0.0, 0
            for ids, engine_tables in first_prompts(check_count):
                for prompt, table in zip(ids, engine_tables, strict=True):
                    kl = kl_per_token(reference.prompt_table(prompt, alpha), table)
                    total, count = total + float(kl.sum()), count + len(kl)
            return total / max(count, 1)

        started = time.perf_counter()
        node_figures = {alpha: tally.node() for alpha, tally in nodes.items()}
        sample_figures = {alpha: tally.node() for alpha, tally in sample.items()}
        kl_nodes = {alpha: tally.node().kl for alpha, tally in check.items()}
        fit = fit_scale(measure, kl_at, *scale_range, nodes=sample_figures, kl_nodes=kl_nodes)
        seconds["scale_fit"] = time.perf_counter() - started
    count = max(nodes[1.0].tokens, 1)
    kl_previous = float(torch.cat(previous_kl).mean()) if previous_kl else None
    return PhaseLogits(
        comparison=tokens.comparison(),
        fit=fit,
        kl_at={alpha: node.kl for alpha, node in node_figures.items()},
        reference_kl={alpha: total / count for alpha, total in reference_kl.items()},
        kl_previous=kl_previous,
        seconds=seconds,
    )


class _EngineTables:
    """The engine's tables of every chunk, kept for the fit's further passes: in memory when there
    is one chunk, else in an unlinked temporary file (read back one chunk at a time)."""

    def __init__(self, spill: bool):
        self._file = tempfile.TemporaryFile(prefix="lora-doctor-") if spill else None
        self._chunks: list = []

    def add(self, tables: list[torch.Tensor]) -> None:
        if self._file is None:
            self._chunks.append(tables)
            return
        layout = []
        for table in tables:
            array = table.float().contiguous().numpy()
            layout.append((self._file.tell(), array.shape))
            array.tofile(self._file)
        self._chunks.append(layout)

    def first(self, chunk: int, count: int) -> list[torch.Tensor]:
        """The tables of the first `count` prompts of chunk number `chunk` (only those are read back)."""
        if self._file is None:
            return self._chunks[chunk][:count]
        tables = []
        for offset, shape in self._chunks[chunk][:count]:
            self._file.seek(offset)
            array = np.fromfile(self._file, dtype=np.float32, count=math.prod(shape)).reshape(shape)
            tables.append(torch.from_numpy(array))
        return tables

    def __enter__(self) -> _EngineTables:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()
