"""The pure math of one step: the gap between the engine's and the policy's log-probs of the sampled
tokens, and the effective LoRA scale those tokens show.

e: the engine's log-probs of the sampled tokens, t: the trainer's (the policy, same weights as were
pushed), b: the base's (the same tokens with the adapter disabled), over the completion tokens.

To first order in the LoRA scale s a token's log-prob moves linearly in s, so e − b ≈ α·(t − b) with α
the scale the engine applies (1 right, 2 double counted, 0 missing): α̂ = ⟨e − b, t − b⟩ / ‖t − b‖².

Its uncertainty comes from the fit's residuals r = (e − b) − α̂(t − b). The tokens of one completion
are not independent (they share a prompt, a KV cache, a sampled prefix): the standard error is the
largest of the independent-token one, the one clustered by completion (each sequence's Σ x·r as one
draw, with the G/(G − 1) small-sample factor) and the one the run's own noise floor gives. Taking the
largest keeps the band honest when the completions are few (a clustered error from 4 sequences is
itself noisy) and when the step's residuals happen to be small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .limits import POSITIVE_LOGPROB, SCALE_BAND_SIGMAS, ZERO_FILLED_SHARE


@dataclass
class Gap:
    """|e − t| over the completion tokens, and the k3 estimate of KL(engine ‖ policy)."""

    mean: float
    max: float
    k3_kl: float
    rms: float
    tokens: int


@dataclass
class ScaleFit:
    """α̂ and what it rests on; `band` is SCALE_BAND_SIGMAS standard errors."""

    alpha: float
    standard_error: float
    band: float
    signal_rms: float  # rms of t − b per token: the LoRA's effect on the sampled tokens
    residual_rms: float  # rms of the fit's residual per token
    explains: float  # the share of ‖e − t‖² the fitted scale explains: 1 − ‖r‖² / ‖e − t‖²
    distinct_tokens: int = 0  # distinct (t − b, e − b) pairs the fit rests on


def relative_precision(*values) -> float:
    """The spacing, relative to their size, of the floats the log-probs were given in: the largest
    machine epsilon of the inputs' dtypes. Float64 (or lists) count as float32: no engine or trainer
    computes log-probs in float64, so such numbers carry float32's rounding at best."""
    epsilon = float(np.finfo(np.float32).eps)
    for each in values:
        if each is None:
            continue
        dtype = getattr(each, "dtype", None)
        if dtype is not None and hasattr(each, "detach"):  # torch
            import torch

            if dtype.is_floating_point:
                epsilon = max(epsilon, float(torch.finfo(dtype).eps))
        elif dtype is not None and np.issubdtype(dtype, np.floating):
            epsilon = max(epsilon, float(np.finfo(dtype).eps))
    return epsilon


def resolution(engine: np.ndarray, policy: np.ndarray, keep: np.ndarray, epsilon: float) -> float:
    """The per-token difference of e and t that rounding alone makes: `epsilon` times their size (rms
    over the kept tokens). No gap, residual or noise floor below it means anything: two float32
    log-probs of the same computation differ by ~1e-7 of their size, and a fit on a handful of tokens
    can leave a residual of 1e-15 that would make any α̂ ≠ 1 'leave 1'."""
    n = int(keep.sum())
    if not n:
        return 0.0
    size = float((np.where(keep, engine, 0.0) ** 2).sum() + (np.where(keep, policy, 0.0) ** 2).sum()) / n
    return epsilon * math.sqrt(size)


def as_array(values) -> np.ndarray:
    """A [batch, tokens] float64 array from a torch tensor, a numpy array or nested lists."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"log-probs must be [batch, tokens], got shape {array.shape}")
    return array


def completion_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    array = as_array(mask)
    if array.shape != shape:
        raise ValueError(f"mask shape {array.shape} differs from the log-probs' {shape}")
    return array > 0


def input_problem(engine: np.ndarray, policy: np.ndarray, base: np.ndarray | None, mask: np.ndarray) -> str | None:
    """What makes these log-probs no measurement of the sync (one line), or None."""
    problems = []
    named = [("engine", engine), ("policy", policy)] + ([("base", base)] if base is not None else [])
    tokens = int(mask.sum())
    for name, values in named:
        inside = values[mask]
        bad = int((~np.isfinite(inside)).sum())
        if bad:
            problems.append(f"{name} log-probs not finite at {bad} of {tokens} completion tokens")
        positive = int((inside[np.isfinite(inside)] > POSITIVE_LOGPROB).sum())
        if positive:
            problems.append(f"{name} log-probs positive at {positive} of {tokens} completion tokens (probabilities or logits, not log-probs)")
    zeros = int((engine[mask] == 0.0).sum())
    if tokens and zeros >= ZERO_FILLED_SHARE * tokens:
        problems.append(f"engine log-probs exactly 0.0 at {zeros} of {tokens} completion tokens (zero-filled: the engine's log-probs were not returned)")
    return "; ".join(problems) or None


def usable(engine: np.ndarray, policy: np.ndarray, base: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """The completion tokens every given log-prob is finite at."""
    keep = mask & np.isfinite(engine) & np.isfinite(policy)
    if base is not None:
        keep &= np.isfinite(base)
    return keep


def gap(engine: np.ndarray, policy: np.ndarray, keep: np.ndarray) -> Gap:
    diff = (engine - policy)[keep]
    if diff.size == 0:
        return Gap(math.nan, math.nan, math.nan, math.nan, 0)
    # k3 (Schulman): with samples from the engine, E[exp(t − e) − 1 − (t − e)] = KL(engine ‖ policy),
    # unbiased and non-negative per token.
    log_ratio = -diff
    k3 = np.expm1(log_ratio) - log_ratio
    return Gap(float(np.abs(diff).mean()), float(np.abs(diff).max()), float(k3.mean()), float(np.sqrt((diff**2).mean())), int(diff.size))


def scale_fit(engine: np.ndarray, policy: np.ndarray, base: np.ndarray, keep: np.ndarray, noise_rms: float | None = None) -> ScaleFit | None:
    """α̂ = ⟨e − b, t − b⟩ / ‖t − b‖² over the kept tokens with its standard error; None when t = b there.

    `noise_rms`: a lower bound on the per-token residual the standard error uses: the run's noise
    floor (rms of e − t on its healthy steps) and at least the numbers' own rounding (`resolution`).
    """
    x = np.where(keep, policy - base, 0.0)
    y = np.where(keep, engine - base, 0.0)
    n = int(keep.sum())
    sxx = float((x * x).sum())
    if n < 2 or sxx == 0.0:
        return None
    alpha = float((x * y).sum()) / sxx
    residual = np.where(keep, y - alpha * x, 0.0)
    residual_rms = math.sqrt(float((residual**2).sum()) / n)
    independent = math.sqrt(float((residual**2).sum()) / (n - 1) / sxx)
    scores = (x * residual).sum(axis=1)[keep.any(axis=1)]  # one draw per completion with kept tokens
    groups = len(scores)
    clustered = math.sqrt(groups / (groups - 1) * float((scores**2).sum())) / sxx if groups >= 2 else 0.0
    floor = noise_rms / math.sqrt(sxx) if noise_rms else 0.0
    error = max(independent, clustered, floor)
    difference = float((np.where(keep, engine - policy, 0.0) ** 2).sum())
    explains = 1.0 - float((residual**2).sum()) / difference if difference else 1.0
    distinct = len(set(zip(x[keep].tolist(), y[keep].tolist())))
    return ScaleFit(alpha, error, SCALE_BAND_SIGMAS * error, math.sqrt(sxx / n), residual_rms, explains, distinct)
