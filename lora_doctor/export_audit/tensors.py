"""The export's tensors paired with those they must match, and the comparison of the tensors the LoRA
does not touch: each must equal the base's (cast to the export's dtype), or the adapter's trained copy
of a `modules_to_save` module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from ..adapter.weight_files import TensorInfo
from ..errors import BadInput


@dataclass
class Difference:
    """A tensor the LoRA does not touch that is not the base's."""

    name: str
    reason: str
    elements: int = 0
    max_abs: float = 0.0

    def to_dict(self) -> dict:
        return {"tensor": self.name, "reason": self.reason, "differing_elements": self.elements, "max_abs_difference": self.max_abs}


@dataclass(frozen=True)
class Pair:
    """An export tensor, the tensor it must match (the base's, or the adapter's trained copy of a
    `modules_to_save` module), and the LoRA module it holds (if any)."""

    name: str
    export: TensorInfo
    base: TensorInfo
    module: str | None


def pair_tensors(
    exported: dict[str, TensorInfo],
    based: dict[str, TensorInfo],
    factors,
    export_dir: Path,
    base_dir: Path,
    *,
    export_ties: bool,
    base_ties: bool,
):
    """Pair the export's tensors with the base's, in the export's on-disk order; list the unpaired.
    `export_ties`, `base_ties`: whether each model ties its head to its embedding (its config)."""
    pairs, absent = [], []
    for name in dict.fromkeys([*based, *exported]):
        mine, theirs = _lookup(exported, export_ties, name), _lookup(based, base_ties, name)
        if mine is None:
            absent.append(Difference(name, "absent from the export"))
            continue
        if theirs is None:
            absent.append(Difference(name, "not in the base"))
            continue
        if mine.shape != theirs.shape:
            raise BadInput(
                f"{name} is {'x'.join(map(str, mine.shape))} in the export but {'x'.join(map(str, theirs.shape))} "
                f"in base {base_dir}: not an export of this base (pass --base)"
            )
        module = name.removesuffix(".weight") if name.removesuffix(".weight") in factors else None
        if module is not None and not (mine.dtype.is_floating_point and mine.dtype.itemsize >= 2):
            raise BadInput(f"{name} is {mine.dtype} in the export: quantized exports are not supported")
        pairs.append(Pair(name, mine, theirs, module))
    if not pairs:
        raise BadInput(f"{export_dir} shares no tensor name with base {base_dir}: not an export of this base")
    # Both folders are then read front to back when they are laid out alike.
    pairs.sort(key=lambda pair: (str(pair.export.path), pair.export.start))
    return pairs, absent


def _lookup(tensors: dict[str, TensorInfo], ties: bool, name: str) -> TensorInfo | None:
    """A tensor by name; a model with tied embeddings may leave its lm_head out (it is the embedding)."""
    if name in tensors:
        return tensors[name]
    if name == "lm_head.weight" and ties:
        return tensors.get("model.embed_tokens.weight")
    return None


def compare_untouched(name: str, mine: torch.Tensor, theirs: torch.Tensor, differences: dict[str, Difference]) -> None:
    """Bit-equal to the base (or to the base cast to the export's dtype); else count what differs."""
    if mine.dtype == theirs.dtype:
        # numpy compares bytes at memory speed; torch.equal was measured ten times slower here.
        if numpy.array_equal(mine.reshape(-1).view(torch.uint8).numpy(), theirs.reshape(-1).view(torch.uint8).numpy()):
            return
        expected = theirs
    else:
        expected = theirs.to(mine.dtype)
        if torch.equal(mine, expected):
            return
    found = differences.setdefault(name, Difference(name, "differs from the base"))
    if mine.dtype.is_floating_point:
        gap = (mine.double() - expected.double()).abs().nan_to_num(nan=float("inf"))
        found.elements += int((gap > 0).sum())
        found.max_abs = max(found.max_abs, float(gap.max()))
    else:
        found.elements += int((mine != expected).sum())
