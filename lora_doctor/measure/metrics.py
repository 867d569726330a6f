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
    Gauss-Newton curvature (the reference's Fisher information along α). Where asked for: the
    objective's whole second derivative along the reference's tangent ℓ + ℓ'·d (renormalised), which
    Gauss-Newton keeps only at a zero residual, and `step`, how far along α that tangent puts the
    objective's minimum."""

    kl: float
    slope: float
    curvature: float
    second: float | None = None
    step: float | None = None


class NodeTally:
    """Sums over tokens of KL(reference@α ‖ engine), its slope and curvature in α, accumulated
    prompt by prompt so that no table outlives its prompt.

    With ℓ = log p_α, u = ℓ' = ∂ℓ/∂α and δ = ℓ − log e: slope = Cov_p(u, δ); curvature = Var_p(u),
    the Gauss-Newton part of the second derivative, exact at a minimum where the engine is the
    reference at some α. With `higher`, the tangent family p·exp(u·d) (an exponential family in d)
    gives the objective's second derivative at d = 0 from joint cumulants of (δ, u) under p:
    second = Var(u) + κ(δ,u,u).
    """

    def __init__(self, higher: bool = False):
        self.tokens = 0
        self.kl = self.slope = self.curvature = self.second = 0.0
        self.higher = higher

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
            covariance = torch.linalg.vecdot(weighted, diff).double() - mean * kl
            variance = torch.linalg.vecdot(weighted, d).double() - mean**2
            self.slope += float(covariance.sum())
            self.curvature += float(variance.sum())
            if self.higher:
                centred = d - mean.to(dtype)[:, None]  # d may be the caller's table: not in place
                mixed = torch.linalg.vecdot(p.mul_(centred).mul_(centred), diff).double() - kl * variance
                self.second += float((variance + mixed).sum())
        per_token.clamp_min_(0.0)
        self.kl += float(per_token.sum())
        self.tokens += engine.shape[0]
        return per_token

    def node(self) -> Node:
        n = max(self.tokens, 1)
        if not self.higher:
            return Node(self.kl / n, self.slope / n, self.curvature / n)
        return Node(self.kl / n, self.slope / n, self.curvature / n, self.second / n)


# Slope ∂ℓ/∂α of the reference's log-probs at α = 0, 1, 2 from its tables at those three scales
# (the parabola through them): weights of (table@0, table@1, table@2).
NODE_SLOPES = {0.0: (-1.5, 2.0, -0.5), 1.0: (-0.5, 0.0, 0.5), 2.0: (0.5, -2.0, 1.5)}


def node_slope(alpha: float, tables: list[torch.Tensor]) -> torch.Tensor:
    """∂ℓ/∂α at node `alpha` from the reference's tables at α = 0, 1, 2."""
    (w0, w1, w2), (t0, t1, t2) = NODE_SLOPES[alpha], tables
    slope = t0.mul(w0).add_(t2, alpha=w2)
    return slope.add_(t1, alpha=w1) if w1 else slope


# Newton iterations along one tangent, and the step in α below which they stop: the tangent is only
# a model of the reference, so 1e-4 (a hundredth of the reported ±0.01) is as far as it is worth.
TANGENT_ITERATIONS = 8
TANGENT_TOLERANCE = 1e-4


def tangent_minimum(tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], low: float, high: float) -> float:
    """The d ∈ [low, high] that minimises the mean KL(softmax(ℓ + u·d) ‖ e) over the prompts'
    (engine e, reference ℓ at α, u = ∂ℓ/∂α there) tables: where the reference's tangent at α puts the
    objective's minimum. Exact for logits linear in α; for the reference, its error is second order
    in d (the curvature of ℓ in α). Newton steps on the exact derivatives of that model, a worse
    point halving the step back."""
    best, best_kl, d = 0.0, math.inf, 0.0
    for _ in range(TANGENT_ITERATIONS):
        tally = NodeTally(higher=True)
        for engine, own, slope in tables:
            tally.add(engine, torch.log_softmax(own + slope * d, -1) if d else own, slope)
        node = tally.node()
        if node.kl > best_kl:
            d = (d + best) / 2  # worse: halfway back
            continue
        best, best_kl = d, node.kl
        step = -node.slope / node.second if node.second > 0 else _newton_step(node)
        d = min(max(d + step, low), high)
        if abs(d - best) < TANGENT_TOLERANCE:
            return d
    return best


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
# Steps the fit may take after the nodes α ∈ {0, 1, 2}; each costs two reference forwards (α and
# α + SLOPE_STEP), on a sample of the prompts, and one more, on a larger sample, checks where the steps
# end: 3 + 2·2 + 1 = 8 reference forwards per phase at most.
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
    and `measure(α)` the objective at a new α with an exact slope and, when it has one, the step to
    the minimum along the reference's tangent there (`tangent_minimum`), both possibly on a sample
    of the tokens; `kl_nodes` and `kl_at(α)` are the objective over the tokens the result is judged
    on (default: the nodes' own). From the best node a Gauss-Newton step (−slope / curvature) says whether the
    minimum is the node itself — the usual ok / double counted / missing phases, no further call —
    and where it is otherwise (`_first_step` for the outer nodes). Then steps to each measured
    point's tangent minimum (Gauss-Newton without one); a worse point sends the next step back
    (`_step_back`); where they end is evaluated by `kl_at`, and the result is the best of that point
    and the nodes.
    """
    overall = dict(kl_nodes) if kl_nodes is not None else {alpha: node.kl for alpha, node in nodes.items()}
    points = {alpha: node.kl for alpha, node in nodes.items()}
    best = min(points, key=points.__getitem__)
    step = _first_step(nodes, best, tolerance)
    # Where the first step overrules the node's own model (outwards, past an outer node), that model's
    # step is the alternative: taken if the outward point is worse (two basins, the node's the right one).
    own = _newton_step(nodes[best])
    alternative = own if step * own < 0 and abs(own) > tolerance else None
    for _ in range(steps if abs(step) > tolerance else 0):
        alpha = min(max(best + step, low), high)
        if min(abs(alpha - x) for x in points) < tolerance / 2:
            if alternative is None:
                break
            step, alternative = alternative, None
            alpha = min(max(best + step, low), high)
        node = measure(alpha)
        points[alpha] = node.kl
        if node.kl >= points[best]:
            step = alternative if alternative is not None else _step_back(best, alpha, node)
            alternative = None
            continue
        alternative = None
        best, step = alpha, node.step if node.step is not None else _newton_step(node)
        if abs(step) <= tolerance:
            break
    target = best if abs(step) <= tolerance else min(max(best + step, low), high)
    if min(abs(target - x) for x in overall) >= tolerance / 2:
        overall[target] = kl_at(target)
    best = min(overall, key=overall.__getitem__)
    at_edge = best <= low + tolerance or best >= high - tolerance
    return ScaleFit(scale=float(best), kl=float(overall[best]), at_edge=at_edge)


# An outer node whose inward Gauss-Newton step explains less than this share of its KL is not near
# the minimum: the slope there is the parabola's extrapolation, and on the loud fixture a minimum
# past the node shows as a slight inward slope (explained share 1e-3 with the engine at 3.5) where
# a true inward minimum explains ≥ 4% (0.25, 0.5, 0.6, 1.8).
EXPLAINED_SHARE = 0.01


def _first_step(nodes: dict[float, Node], best: float, tolerance: float) -> float:
    """The step from the best node. Past the outer nodes the parabola's slope is an extrapolation:
    a step outwards is at least one node spacing, and so is one from an outer node that the objective
    falls into from its neighbour while its quadratic model cannot explain its KL, or while the
    parabola through the nodes' KL keeps falling past it (the minimum lies beyond, past a ridge the
    extrapolated slope does not see: on a 151,936-token vocabulary an engine at α = 2.83 showed from
    α = 2 an inward slope explaining 27% of the KL, with KL 9.8, 4.6, 0.85 at α = 0, 1, 2)."""
    node, step = nodes[best], _newton_step(nodes[best])
    if abs(step) <= tolerance or best not in (min(nodes), max(nodes)):
        return step
    outward = 1.0 if best == max(nodes) else -1.0
    if step * outward > 0:
        return outward * max(abs(step), 1.0)
    explained = -0.5 * node.slope * step  # the model's fall to its minimum: slope²/(2·curvature)
    if explained < EXPLAINED_SHARE * node.kl or _kl_parabola_falls_past(nodes, best, outward):
        return outward
    return step


def _kl_parabola_falls_past(nodes: dict[float, Node], best: float, outward: float) -> bool:
    """Whether the parabola through the objective's values at the nodes α = 0, 1, 2 still falls at
    the outer node `best`, going outwards (its slope there: the same weights as `node_slope`'s)."""
    slope = sum(weight * nodes[alpha].kl for weight, alpha in zip(NODE_SLOPES[best], sorted(NODE_SLOPES), strict=True))
    return slope * outward < 0


def _step_back(best: float, alpha: float, node: Node) -> float:
    """From `best`, the step after a worse point at `alpha`: to the minimum that point's tangent
    names when it lies between the two (the minimum was overshot), else halfway back."""
    if node.step is not None and min(best, alpha) < alpha + node.step < max(best, alpha):
        return alpha + node.step - best
    return (alpha - best) / 2


def _newton_step(node: Node) -> float:
    return -node.slope / node.curvature if node.curvature > 0 else 0.0


def greedy_match(reference: list[list[int]], engine: list[list[int]]) -> float:
    """Fraction of prompts whose greedy continuation is identical token for token."""
    same = [r == e for r, e in zip(reference, engine, strict=True)]
    return sum(same) / len(same) if same else 1.0
