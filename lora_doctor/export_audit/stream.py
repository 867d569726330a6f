"""Read every export tensor and its counterpart once, in large row chunks, and feed the per-module sums
and the untouched comparison. Every figure is a sum over chunks, so memory does not grow with the model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..adapter.lora_delta import LoraFactors
from ..adapter.weight_files import read_chunks
from .figures import ModuleFigures, ModuleSums
from .tensors import Difference, Pair, compare_untouched

# Bytes of one tensor per read. The export and the base are read in turn; from a cold page cache,
# 1 MiB reads alternating between two files ran at half a plain sequential read, 32 MiB reads close to it.
READ_BYTES = 32 * 2**20
# Bytes of one tensor per step of the module arithmetic: small enough that a step's vectors stay in the
# CPU caches (1 MiB measured faster than 256 KiB and than 4 MiB).
STEP_BYTES = 2**20

Progress = Callable[[str], None]


@contextmanager
def one_compute_thread() -> Iterator[None]:
    """Compute on one torch thread while the reader thread reads.

    A chunk's arithmetic (~1 MB) is too small to gain from more threads, and on a machine whose
    other cores are busy, intra-op threads waiting for each other made the audit ten times slower
    (0.06 against 0.67 GB/s, measured on 2 shared cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stream(pairs: list[Pair], factors: dict[str, LoraFactors], say: Progress) -> tuple[list[ModuleFigures], list[Difference]]:
    """Read every pair once: measure each LoRA module when its last rows arrive, compare the rest with the base."""
    figures: list[ModuleFigures] = []
    differences: dict[str, Difference] = {}
    module: ModuleSums | None = None
    for chunk in read_chunks([[pair.export, pair.base] for pair in pairs], READ_BYTES):
        pair = pairs[chunk.group]
        merged, w0 = chunk.tensors
        if pair.module is None:
            compare_untouched(pair.name, merged, w0, differences)
            continue
        if chunk.row_start == 0:
            say(f"comparing {pair.name}")
            module = ModuleSums(pair.module, factors[pair.module], pair.export.shape)
        step = max(1, STEP_BYTES // max(pair.export.row_bytes, pair.base.row_bytes, 1))
        for start in range(0, chunk.row_end - chunk.row_start, step):
            rows = slice(start, start + step)
            module.add_rows(chunk.row_start + start, chunk.row_start + start + len(merged[rows]), merged[rows], w0[rows])
        if chunk.last:
            measured = module.figures()
            if measured is not None:
                figures.append(measured)
            module = None
    return figures, list(differences.values())
