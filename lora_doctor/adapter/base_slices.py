"""Slices of a base model's weights, read at the places its inventory gives (no header parsed again):
what the per-module read compares the engine's weights with, one layer at a time."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BadInput
from .weight_files import TensorInfo

# Unsigned integers of each element size: the bytes are mapped as these, then viewed as the tensor's
# dtype (numpy has no bfloat16).
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class BaseSlices:
    """Blocks of the base's 2-D weights by module name (the weight key without `.weight`), through a
    memory map of each weight's bytes, kept until `release`.

    `rename` maps a base weight key to the name the reader asks for (vLLM's `hf_to_vllm_mapper`
    renames, for models that rename weights on load; None: the keys as they are)."""

    def __init__(self, tensors: dict[str, TensorInfo], rename=None):
        self._tensors = tensors
        # Reader's module name → the base's weight key.
        self._keys = {}
        for key in tensors:
            if key.endswith(".weight"):
                mapped = rename(key) if rename is not None else key
                if mapped is not None:
                    self._keys[mapped.removesuffix(".weight")] = key
        self._maps: dict[str, np.memmap] = {}

    def checkpoint_name(self, module: str) -> str:
        """The base's module name of the reader's `module`."""
        if module not in self._keys:
            raise BadInput(f"the base checkpoint has no weight for the engine's module {module}")
        return self._keys[module].removesuffix(".weight")

    def shape(self, module: str) -> tuple[int, int]:
        """The shape of the base's module `module` (its own name)."""
        return tuple(self._tensors[f"{module}.weight"].shape)

    def read(self, module: str, rows: slice | list[int], cols: slice) -> torch.Tensor:
        """Rows `rows` (a slice, or a list of row indices), columns `cols` of the base's module `module`
        (its own name), in its stored dtype."""
        info = self._tensors[f"{module}.weight"]
        block = np.array(self._map(info)[rows, cols], copy=True)  # its own memory, not the map's pages
        return torch.from_numpy(block).view(info.dtype)

    def release(self) -> None:
        """Drop the maps made so far: the pages of a mapped file stay in the process's RSS while it is
        mapped, so a read that kept them would end up holding the whole base."""
        self._maps.clear()

    def _map(self, info: TensorInfo) -> np.memmap:
        if info.name not in self._maps:
            raw = _RAW[torch.empty((), dtype=info.dtype).element_size()]
            try:
                self._maps[info.name] = np.memmap(info.path, dtype=raw, mode="r", offset=info.start, shape=info.shape)
            except (OSError, ValueError) as error:
                raise BadInput(f"cannot read {info.name} from {info.path} ({error})") from None
        return self._maps[info.name]
