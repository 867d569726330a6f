"""What lora-doctor sends its worker extension (engine/worker.py) and what the worker sends back, with
no vLLM import: the driver side (the measurer) builds the request and reads the answer by these names.

The request is made from the opened checkpoint: where the base's weights and each module's LoRA factors
sit in their files, and the factors' scaling. Places, not values: a few hundred entries for a 7B model,
and the worker reads no config and no header, only the bytes of the tensors it compares. It crosses
`collective_rpc` in its wire form (`to_wire`: lists, strings and numbers), which every transport vLLM
uses carries: pickle to tensor-parallel workers, msgpack to an engine core in a process of its own
(which refuses other objects unless VLLM_ALLOW_INSECURE_SERIALIZATION is set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter.checkpoint import Checkpoint
from ..adapter.dtypes import dtype_name
from ..adapter.lora_delta import FactorRef, OpenedAdapter, base_key, factor_refs
from ..adapter.weight_files import TensorInfo

# The sums the worker accumulates per shard (float64), over the shard's elements, for
#   b = W_base − W0_D   what the engine's base weight adds to the base model (W0_D: W0 in the engine's dtype),
#   s = W_slot          what the engine's LoRA slot adds (0 when the phase generates without an adapter),
#   Δ = ΔW              the checkpoint's exact LoRA delta,
#   e = merge_in_dtype(W0, ΔW, D) − W0_D   what a merged sync in the engine's dtype D adds to the base,
# and w = W0_D itself.
STAT_KEYS = ("bb", "be", "ee", "bD", "ss", "sD", "bs", "DD", "eD", "ww")


@dataclass(frozen=True)
class LayerRead:
    """What `LoraDoctorWorker.lora_doctor_layer_stats` reads every LoRA-wrapped linear layer against:
    the base's weights (key → place) and each adapter module's factors, by the base's module name
    (its weight key without `.weight`: the shards are named by the base, the report by the adapter,
    `FactorRef.module`)."""

    base_tensors: dict[str, TensorInfo]
    factors: dict[str, FactorRef]


def layer_read(checkpoint: Checkpoint, adapter: Checkpoint | OpenedAdapter | str | Path | None = None) -> LayerRead:
    """The request for `adapter`'s ΔW (default: the checkpoint's own) on the checkpoint's base, joined
    on the checkpoint's name map."""
    refs = factor_refs(checkpoint if adapter is None else adapter)
    names = checkpoint.names
    return LayerRead(
        base_tensors=checkpoint.base().tensors,
        factors={base_key(module, names).removesuffix(".weight"): ref for module, ref in refs.items()},
    )


def to_wire(request: LayerRead) -> dict:
    """`request` as lists, strings and numbers (what any transport of `collective_rpc` carries)."""
    return {
        "base_tensors": [_tensor_to_wire(info) for info in request.base_tensors.values()],
        "factors": {
            name: [ref.module, _tensor_to_wire(ref.A), _tensor_to_wire(ref.B), ref.scaling, ref.fan_in_fan_out]
            for name, ref in request.factors.items()
        },
    }


def from_wire(data: dict) -> LayerRead:
    """The request `to_wire` gave, as the worker reads it."""
    base = [_tensor_from_wire(item) for item in data["base_tensors"]]
    return LayerRead(
        base_tensors={info.name: info for info in base},
        factors={
            name: FactorRef(module, _tensor_from_wire(a), _tensor_from_wire(b), float(scaling), bool(fan_in_fan_out))
            for name, (module, a, b, scaling, fan_in_fan_out) in data["factors"].items()
        },
    )


def _tensor_to_wire(info: TensorInfo) -> list:
    return [info.name, str(info.path), dtype_name(info.dtype), list(info.shape), info.start, info.end]


def _tensor_from_wire(item: list) -> TensorInfo:
    name, path, dtype, shape, start, end = item
    return TensorInfo(name, Path(path), getattr(torch, dtype), tuple(shape), start, end)
