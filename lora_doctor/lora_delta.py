"""ΔW of a PEFT LoRA adapter, with PEFT's exact scaling, and the driver-side reduction of
the worker's per-shard statistics of d = W_eng − W0 against ΔW. No vLLM import."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput

PEFT_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: ΔW = scaling · B @ A (A: r × in, B: out × r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        """ΔW (float32) in the base weight's own layout, as PEFT's `get_delta_weight` returns it."""
        delta = (self.B.float() @ self.A.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


def merge_in_dtype(w0: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a trainer's merge `W0 + ΔW` holds when its weights live in `dtype`.

    PEFT's `merge` computes ΔW in float32 and casts it to the weight's dtype, then adds it in place:
    round(round(W0) + round(ΔW)). In bf16 every part of ΔW below half an ulp of W0 is lost, so a
    merged sync in bf16 is expected to hold this, not the exact W0 + ΔW.
    """
    return (w0.to(dtype) + delta.to(dtype)).to(dtype)


def load_lora_factors(adapter_dir: str | Path) -> dict[str, LoraFactors]:
    """Module name of the base model (e.g. "model.layers.0.self_attn.q_proj") → its LoRA factors."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise BadInput(f"{adapter_dir}: DoRA adapters are not supported (ΔW is not scaling·B·A)")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors = {}
    for key, lora_a in tensors.items():
        if not key.endswith(_A_SUFFIX):
            continue
        module = key[: -len(_A_SUFFIX)].removeprefix(PEFT_PREFIX)
        lora_b = tensors[key[: -len(_A_SUFFIX)] + _B_SUFFIX]
        factors[module] = LoraFactors(
            A=lora_a,
            B=lora_b,
            scaling=peft_scaling(config, module),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        )
    return factors


def peft_scaling(config: dict, module: str) -> float:
    """The scaling PEFT gives `module`, with rank_pattern / alpha_pattern overrides."""
    r = config.get("rank_pattern", {}) or {}
    alpha = config.get("alpha_pattern", {}) or {}
    rank = r.get(_pattern_key(r, module), config["r"])
    lora_alpha = alpha.get(_pattern_key(alpha, module), config.get("lora_alpha", 8))  # 8: PEFT's default
    return lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pattern_key(patterns: dict, module: str) -> str:
    """PEFT's `get_pattern_key`: the first key that matches a dotted suffix of the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def combine_layer_stats(per_rank_results: list[list[dict]]) -> list[dict]:
    """Sum the per-shard sums of `LoraDoctorWorker.lora_doctor_layer_stats` (one list per
    rank) into per-module figures for d = W_eng − W0 against ΔW:
    effective_scale = <d,ΔW>/‖ΔW‖², residual = ‖d − scale·ΔW‖/‖ΔW‖,
    divergence = ‖d − ΔW‖/‖ΔW‖ (all None where ΔW = 0), d_norm = ‖d‖, delta_norm = ‖ΔW‖."""
    by_module: dict[str, dict[tuple, dict]] = {}
    for shard in (s for rank in per_rank_results for s in rank):
        place = (shard["out_offset"], shard["out_size"], shard["in_offset"], shard["in_size"])
        # Replicated kv heads: several ranks hold the same rows; count them once.
        by_module.setdefault(shard["module"], {}).setdefault(place, shard)
    return [_combine(module, list(shards.values())) for module, shards in sorted(by_module.items())]


def _combine(module: str, shards: list[dict]) -> dict:
    _check_tiling(module, shards)
    dd, dD, DD = (math.fsum(s[key] for s in shards) for key in ("dd", "dD", "DD"))
    figures = {"effective_scale": None, "residual": None, "divergence": None}
    if DD > 0:
        scale = dD / DD
        figures = {
            "effective_scale": scale,
            "residual": math.sqrt(max(dd - scale * dD, 0.0) / DD),
            "divergence": math.sqrt(max(dd - 2 * dD + DD, 0.0) / DD),
        }
    return {"module": module, **figures, "d_norm": math.sqrt(dd), "delta_norm": math.sqrt(DD)}


def _check_tiling(module: str, shards: list[dict]) -> None:
    """The shards must cover the full matrix exactly once."""
    out_features, in_features = shards[0]["out_features"], shards[0]["in_features"]
    boxes = [(s["out_offset"], s["out_size"], s["in_offset"], s["in_size"]) for s in shards]
    inside = all(o >= 0 and i >= 0 and o + h <= out_features and i + w <= in_features for o, h, i, w in boxes)
    area = sum(h * w for _, h, _, w in boxes)
    overlap = any(
        a[0] < b[0] + b[1] and b[0] < a[0] + a[1] and a[2] < b[2] + b[3] and b[2] < a[2] + a[3]
        for k, a in enumerate(boxes)
        for b in boxes[k + 1 :]
    )
    if not inside or overlap or area != out_features * in_features:
        raise ValueError(f"{module}: shards {boxes} do not tile its {out_features}x{in_features} weight")
