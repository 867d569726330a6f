"""Custom sync plans during which the machine, not the plan, fails: each must exit 3 with one line.

The failures are real: the address space is limited to what the process already maps (so the next
map or large allocation fails), or the base's weights are removed from disk before the engine
reloads them. The limit is lifted as the error propagates, so lora-doctor can still report it.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_memory_left(extra_bytes: int = 0, heap_too: bool = False) -> Iterator[None]:
    """Limit the address space to what the process maps now plus `extra_bytes`, for the block. With
    `heap_too`, the heap's free blocks of 64 kB and more are taken as well (held until the block ends),
    so an allocation that the heap would still serve without a new map fails too: the tiny fixture's
    tensors are that small."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        mapped = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, hard))
    held = []
    try:
        while heap_too:
            try:
                held.append(bytearray(1 << 16))
            except MemoryError:
                break
        yield
    finally:
        held.clear()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def out_of_memory_adding_the_adapter(sync):
    sync.reload_from_disk()
    with no_memory_left():
        sync.add_adapter()
    sync.probe("adapter")


def out_of_memory_merging(sync):
    # The merge reads the LoRA factors and each base weight into memory of their own (no map).
    with no_memory_left(heap_too=True):
        sync.load_merged()
    sync.probe("full-merged")


def base_removed_before_the_engine_reloads_it(sync):
    for weights in sync.checkpoint.base_dir.glob("*.safetensors"):
        weights.unlink()
    sync.reload_from_disk()
    sync.probe("after-wake-up")
