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


def kl_per_token(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probs; tokens where p is 0 contribute nothing."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0.0)


def compare_logprobs(reference: list[torch.Tensor], engine: list[torch.Tensor]) -> LogitComparison:
    """KL(reference ‖ engine) mean and max per prompt token, and top-1 agreement."""
    per_prompt = [kl_per_token(r.double(), e.double()) for r, e in zip(reference, engine, strict=True)]
    all_kl = torch.cat(per_prompt)
    agree = torch.cat([r.argmax(-1) == e.argmax(-1) for r, e in zip(reference, engine, strict=True)])
    return LogitComparison(
        kl_mean=float(all_kl.mean()),
        kl_max=float(all_kl.max()),
        top1_agreement=float(agree.double().mean()),
        kl_per_token=[k.tolist() for k in per_prompt],
    )


def mean_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    """KL(p ‖ q) averaged over every token of every prompt."""
    return float(torch.cat([kl_per_token(a.double(), b.double()) for a, b in zip(p, q, strict=True)]).mean())


@dataclass(frozen=True)
class ScaleFit:
    """The LoRA scale at which the reference best explains the engine, and how well it does."""

    scale: float
    kl: float
    # The best scale sits at an end of the searched range: the true one may lie beyond it.
    at_edge: bool = False


def fit_scale(
    objective: Callable[[float], float],
    low: float = -1.0,
    high: float = 4.0,
    grid_step: float = 0.25,
    tolerance: float = 1e-3,
) -> ScaleFit:
    """Minimise `objective(s)` over [low, high]: a coarse grid, then golden-section search.

    The grid guards against local minima far from the optimum; golden section then refines
    within one grid step on each side of the best grid point.
    """
    steps = round((high - low) / grid_step)
    grid = [low + i * grid_step for i in range(steps + 1)]
    values = [objective(s) for s in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = objective(c), objective(d)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = objective(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = objective(d)
    candidates = [(values[best], grid[best]), (fc, c), (fd, d)]
    kl, scale = min(candidates)
    return ScaleFit(scale=float(scale), kl=float(kl))


def greedy_match(reference: list[list[int]], engine: list[list[int]]) -> float:
    """Fraction of prompts whose greedy continuation is identical token for token."""
    same = [r == e for r, e in zip(reference, engine, strict=True)]
    return sum(same) / len(same) if same else 1.0
