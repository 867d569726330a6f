"""The caller's random generators, saved before lora-doctor's work and given back after it.

Building a vLLM engine calls vLLM's `set_random_seed(seed)`, which reseeds Python's `random`, numpy's
and torch's global generators (CPU and every CUDA device) in the caller's process; the reference's
forward and vLLM's sampling draw from them too. A training script seeded for reproducibility would
continue from seed 0 after a gate. Every check, gate and probe therefore runs inside
`preserved_random_state()`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy
import torch


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Python's, numpy's, torch's CPU and every CUDA device's generator states, restored on the way out."""
    saved = _save()
    try:
        yield
    finally:
        _restore(saved)


def preserves_random_state(function):
    """Decorate a function so that it runs inside `preserved_random_state()`."""

    @functools.wraps(function)
    def preserving(*args, **kwargs):
        with preserved_random_state():
            return function(*args, **kwargs)

    return preserving


def _save() -> dict:
    saved = {
        "random": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.random.get_rng_state(),
        # What CUDA's generators start from when CUDA is first used: `torch.manual_seed` queues this
        # seed for them, and an unseeded process has the same default seed on CPU and CUDA.
        "torch_seed": torch.initial_seed(),
        "cuda": None,
    }
    # Reading an uninitialized device's generator would create a CUDA context in the caller's process.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        saved["cuda"] = torch.cuda.get_rng_state_all()
    return saved


def _restore(saved: dict) -> None:
    random.setstate(saved["random"])
    numpy.random.set_state(saved["numpy"])
    torch.random.set_rng_state(saved["torch"])
    if saved["cuda"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda"])
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        # CUDA was first used inside the block (and reseeded there): the generators it would have had.
        torch.cuda.manual_seed_all(saved["torch_seed"])
