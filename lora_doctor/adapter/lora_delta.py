"""ΔW of a PEFT LoRA adapter, with PEFT's exact scaling, and what a merge in a given dtype holds. No vLLM import."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput
from .checkpoint import spec_from_config
from .inventory import ADAPTER_CONFIG, read_adapter, read_json


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: ΔW = scaling · B @ A (A: r × in, B: out × r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    def delta(self, rows: slice = slice(None), cols: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW[rows, cols] in the base weight's own layout, as PEFT's `get_delta_weight` returns it
        (transposed for `fan_in_fan_out` layers, whose weight is stored in × out). The one ΔW every
        part of lora-doctor uses: the sync's merges, the per-module read and the audit."""
        if self.fan_in_fan_out:
            # The stored weight is (ΔWᵀ): its rows index A's columns, its columns B's rows.
            return ((self.B[cols].to(dtype) @ self.A[:, rows].to(dtype)) * self.scaling).T
        return (self.B[rows].to(dtype) @ self.A[:, cols].to(dtype)) * self.scaling


def merge_in_dtype(w0: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a trainer's merge `W0 + ΔW` holds when its weights live in `dtype`.

    PEFT's `merge` computes ΔW in float32 and casts it to the weight's dtype, then adds it in place:
    round(round(W0) + round(ΔW)). In bf16 every part of ΔW below half an ulp of W0 is lost, so a
    merged sync in bf16 is expected to hold this, not the exact W0 + ΔW.
    """
    return (w0.to(dtype) + delta.to(dtype)).to(dtype)


def load_lora_factors(adapter_dir: str | Path) -> dict[str, LoraFactors]:
    """Module name of the base model (e.g. "model.layers.0.self_attn.q_proj") → its LoRA factors."""
    adapter_dir = Path(adapter_dir)
    spec = spec_from_config(read_json(adapter_dir / ADAPTER_CONFIG), adapter_dir)
    if spec.use_dora:
        raise BadInput(f"{adapter_dir}: DoRA adapters are not supported (ΔW is not scaling·B·A)")
    inventory = read_adapter(adapter_dir)
    values = inventory.read([t for factors in inventory.linear.values() for t in factors.values()])
    return {
        module: LoraFactors(
            A=values[factors["A"].name],
            B=values[factors["B"].name],
            scaling=spec.scaling_for(module),
            fan_in_fan_out=spec.fan_in_fan_out,
        )
        for module, factors in inventory.linear.items()
    }
