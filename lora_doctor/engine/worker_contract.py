"""What lora-doctor sends its worker extension (engine/worker.py) and what the worker sends back, with
no vLLM import: the driver side (the measurer) builds the request and reads the answer by these names.

The request is made from the opened checkpoint: where the base's weights and each module's LoRA factors
sit in their files, and the factors' scaling. Places, not values, so it pickles small through
`collective_rpc` (a few hundred entries for a 7B model), and the worker reads no config and no header:
only the bytes of the tensors it compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..adapter.checkpoint import Checkpoint
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
