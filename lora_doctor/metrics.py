"""Distances between the reference's and the engine's next-token distributions, and scale fits."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitComparison:
    """How far the engine's distributions are from the reference's, over all prompt tokens."""

    kl_mean: float
    kl_max: float
    top1_agreement: float
    kl_per_token: list[list[float]]


# Rows compared at a time: bounds every float temporary to ~4M entries (16 MB), whatever the vocab.
_BLOCK_ENTRIES = 1 << 22


def _row_blocks(rows: int, vocab: int):
    step = max(1, _BLOCK_ENTRIES // max(vocab, 1))
    return (slice(start, min(start + step, rows)) for start in range(0, rows, step))


def kl_per_token(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probs, as float64; tokens where p is 0 contribute nothing.

    Computed in float32 (the tables' own precision; float64 tables stay float64) a block of rows
    at a time; each row's sum is
    a dot product, whose float32 rounding (~1e-7 of Σ|p·(log p − log q)|) is far below any KL
    lora-doctor tells apart.
    """
    dtype = _working_dtype(p_log)
    out = torch.empty(p_log.shape[0], dtype=torch.float64)
    for rows in _row_blocks(*p_log.shape):
        out[rows] = _kl_terms(p_log[rows].to(dtype), q_log[rows].to(dtype))[2].double()
    return out.clamp_min(0.0)


def _working_dtype(table: torch.Tensor) -> torch.dtype:
    return torch.float64 if table.dtype == torch.float64 else torch.float32


def _kl_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p, log p − log q and the per-row KL(p ‖ q). Entries where p is 0 contribute nothing; they
    can only make a row NaN (0·−∞), so only such rows are masked, after the fact."""
    p = p_log.exp()
    diff = p_log - q_log
    kl = torch.linalg.vecdot(p, diff)
    rows = kl.isnan().nonzero().flatten()
    if len(rows):
        diff[rows] = torch.where(p[rows] > 0, diff[rows], 0.0)
        kl[rows] = torch.linalg.vecdot(p[rows], diff[rows])
    return p, diff, kl


def compare_logprobs(reference: list[torch.Tensor], engine: list[torch.Tensor]) -> LogitComparison:
    """KL(reference ‖ engine) mean and max per prompt token, and top-1 agreement."""
    tally = TokenTally()
    for r, e in zip(reference, engine, strict=True):
        tally.add(r, e)
    return tally.comparison()


def mean_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    """KL(p ‖ q) averaged over every token of every prompt."""
    return float(torch.cat([kl_per_token(a, b) for a, b in zip(p, q, strict=True)]).mean())


class TokenTally:
    """KL(reference ‖ engine) per token and top-1 agreement, accumulated prompt by prompt."""

    def __init__(self):
        self.kl: list[list[float]] = []
        self.agree = 0

    def add(self, reference: torch.Tensor, engine: torch.Tensor, kl: torch.Tensor | None = None) -> None:
        self.kl.append((kl_per_token(reference, engine) if kl is None else kl).tolist())
        self.agree += int((reference.argmax(-1) == engine.argmax(-1)).sum())

    @property
    def prompts(self) -> int:
        return len(self.kl)

    def comparison(self) -> LogitComparison:
        tokens = [k for row in self.kl for k in row]
        return LogitComparison(
            kl_mean=sum(tokens) / len(tokens) if tokens else 0.0,
            kl_max=max(tokens, default=0.0),
            top1_agreement=self.agree / len(tokens) if tokens else 1.0,
            kl_per_token=self.kl,
        )


@dataclass(frozen=True)
class Node:
    """The fit objective at one scale α: mean KL(reference@α ‖ engine), its slope in α and its
    Gauss-Newton curvature (the reference's Fisher information along α)."""

    kl: float
    slope: float
    curvature: float


class NodeTally:
    """Sums over tokens of KL(reference@α ‖ engine), its slope and curvature in α, accumulated
    prompt by prompt so that no table outlives its prompt.

    With ℓ = log p_α and ℓ' = ∂ℓ/∂α: slope = Cov_p(ℓ', ℓ − log e); curvature = Var_p(ℓ'), the
    Gauss-Newton part of the second derivative, exact at a minimum where the engine is the
    reference at some α.
    """

    def __init__(self):
        self.tokens = 0
        self.kl = self.slope = self.curvature = 0.0

    def add(self, engine: torch.Tensor, own: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        """One prompt: the engine's table, the reference's at α and ∂ℓ/∂α there. Returns the
        per-token KL."""
        dtype = _working_dtype(engine)
        per_token = torch.empty(engine.shape[0], dtype=torch.float64)
        for rows in _row_blocks(*engine.shape):
            p, diff, kl = _kl_terms(own[rows].to(dtype), engine[rows].to(dtype))
            kl = kl.double()
            d = slope[rows].to(dtype)
            weighted = p * d
            mean = weighted.sum(-1).double()
            per_token[rows] = kl
            self.slope += float((torch.linalg.vecdot(weighted, diff).double() - mean * kl).sum())
            self.curvature += float((torch.linalg.vecdot(weighted, d).double() - mean**2).sum())
        per_token.clamp_min_(0.0)
        self.kl += float(per_token.sum())
        self.tokens += engine.shape[0]
        return per_token

    def node(self) -> Node:
        n = max(self.tokens, 1)
        return Node(self.kl / n, self.slope / n, self.curvature / n)


# Slope ∂ℓ/∂α of the reference's log-probs at α = 0, 1, 2 from its tables at those three scales
# (the parabola through them): weights of (table@0, table@1, table@2).
NODE_SLOPES = {0.0: (-1.5, 2.0, -0.5), 1.0: (-0.5, 0.0, 0.5), 2.0: (0.5, -2.0, 1.5)}


def node_slope(alpha: float, tables: list[torch.Tensor]) -> torch.Tensor:
    """∂ℓ/∂α at node `alpha` from the reference's tables at α = 0, 1, 2."""
    (w0, w1, w2), (t0, t1, t2) = NODE_SLOPES[alpha], tables
    slope = t0.mul(w0).add_(t2, alpha=w2)
    return slope.add_(t1, alpha=w1) if w1 else slope


@dataclass(frozen=True)
class ScaleFit:
    """The LoRA scale at which the reference best explains the engine, and how well it does.

    `kl` is the mean KL(reference at `scale` ‖ engine); `at_edge` is True when the best scale is at
    an end of the searched range, i.e. the true one may lie beyond it.
    """

    scale: float
    kl: float
    at_edge: bool = False


# The fit stops when a step moves α by less than this: half the ±0.01 the scale is reported to.
SCALE_TOLERANCE = 5e-3
# Gauss-Newton steps the fit may take after the nodes α ∈ {0, 1, 2}; each costs two reference
# forwards (α and α + SLOPE_STEP), on a sample of the prompts, and one more over every prompt checks
# where the steps end: 3 + 2·2 + 1 = 8 reference forwards per phase at most.
FIT_STEPS = 2
# α step of the forward difference that gives ∂ℓ/∂α away from the nodes: small against the
# curvature of ℓ in α, large against float32 rounding of log-probs (~1e-6).
SLOPE_STEP = 1e-2


def fit_scale(
    measure: Callable[[float], Node],
    kl_at: Callable[[float], float],
    low: float,
    high: float,
    nodes: dict[float, Node],
    kl_nodes: dict[float, float] | None = None,
    steps: int = FIT_STEPS,
    tolerance: float = SCALE_TOLERANCE,
) -> ScaleFit:
    """Minimise the mean KL(reference@α ‖ engine) over α ∈ [low, high].

    `nodes` are the objective at α = 0, 1, 2 (slopes from the parabola through the three tables)
    and `measure(α)` the objective at a new α with an exact slope, both possibly on a sample of the
    tokens; `kl_nodes` and `kl_at(α)` are the objective over every token (default: the nodes' own).
    From the best node a Gauss-Newton step (−slope / curvature) says whether the minimum is the
    node itself — the usual ok / double counted / missing phases, no further call — and where it
    is otherwise; past the outer nodes, where the parabola's slope is an extrapolation, the first
    step is at least one node spacing. Then Gauss-Newton steps on exact slopes, a worse point
    halving the step back; where they end is evaluated over every token, and the result is the
    best of that point and the nodes.
    """
    overall = dict(kl_nodes) if kl_nodes is not None else {alpha: node.kl for alpha, node in nodes.items()}
    points = {alpha: node.kl for alpha, node in nodes.items()}
    best = min(points, key=points.__getitem__)
    step = _newton_step(nodes[best])
    if abs(step) > tolerance and ((best == min(nodes) and step < 0) or (best == max(nodes) and step > 0)):
        step = math.copysign(max(abs(step), 1.0), step)
    for _ in range(steps if abs(step) > tolerance else 0):
        alpha = min(max(best + step, low), high)
        if min(abs(alpha - x) for x in points) < tolerance / 2:
            break
        node = measure(alpha)
        points[alpha] = node.kl
        if node.kl >= points[best]:
            step = (alpha - best) / 2  # worse: halfway back
            continue
        best, step = alpha, _newton_step(node)
        if abs(step) <= tolerance:
            break
    target = best if abs(step) <= tolerance else min(max(best + step, low), high)
    if min(abs(target - x) for x in overall) >= tolerance / 2:
        overall[target] = kl_at(target)
    best = min(overall, key=overall.__getitem__)
    at_edge = best <= low + tolerance or best >= high - tolerance
    return ScaleFit(scale=float(best), kl=float(overall[best]), at_edge=at_edge)


def _newton_step(node: Node) -> float:
    return -node.slope / node.curvature if node.curvature > 0 else 0.0


def greedy_match(reference: list[list[int]], engine: list[list[int]]) -> float:
    """Fraction of prompts whose greedy continuation is identical token for token."""
    same = [r == e for r, e in zip(reference, engine, strict=True)]
    return sum(same) / len(same) if same else 1.0
