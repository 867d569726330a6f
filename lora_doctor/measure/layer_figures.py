"""Per-module figures from the sums the worker extension accumulates per weight shard: how much of ΔW the
engine's base and its LoRA slot hold (the sums are named in engine/worker_contract.py). Driver side, no vLLM import."""

from __future__ import annotations

import math

from ..engine.worker_contract import STAT_KEYS


def combine_layer_stats(per_rank_results: list[list[dict]]) -> list[dict]:
    """Sum the per-shard sums of `LoraDoctorWorker.lora_doctor_layer_stats` (one list per rank)
    into per-module figures; see `module_figures`."""
    by_module: dict[str, dict[tuple, dict]] = {}
    for shard in (s for rank in per_rank_results for s in rank):
        place = (shard["out_offset"], shard["out_size"], shard["in_offset"], shard["in_size"])
        # Replicated kv heads: several ranks hold the same rows; count them once.
        by_module.setdefault(shard["module"], {}).setdefault(place, shard)
    combined = []
    for module, shards in sorted(by_module.items()):
        shards = list(shards.values())
        _check_tiling(module, shards)
        sums = {key: math.fsum(s[key] for s in shards) for key in STAT_KEYS}
        combined.append({"module": module, **module_figures(sums, shards[0]["eps"])})
    return combined


def module_figures(sums: dict[str, float], eps: float) -> dict:
    """Per-module figures from the sums of `STAT_KEYS` and the engine dtype's `eps` (None where ΔW = 0):

    - base_part = <b, e>/‖e‖²: how much of a merged sync the base holds (0 unmerged, 1 merged);
    - slot_part = <s, ΔW>/‖ΔW‖²: how much ΔW the adapter slot holds (0 none, 1 loaded);
    - base_residual, slot_residual: what each part holds beyond that multiple, over ‖ΔW‖;
    - merge_kept = <e, ΔW>/‖ΔW‖²: the part of ΔW a merge in the engine's dtype keeps (1 in float32),
      merge_noise = ‖e − merge_kept·ΔW‖/‖ΔW‖: what that merge's rounding adds beside it;
    - effective_scale, residual, divergence: the engine's whole weight d = b + s against the exact ΔW
      (<d, ΔW>/‖ΔW‖², ‖d − scale·ΔW‖/‖ΔW‖, ‖d − ΔW‖/‖ΔW‖);
    - rounding = eps·‖W0‖/‖ΔW‖: an ulp of every element, over ‖ΔW‖ — two correct roundings of the
      same merge (in any order) differ by at most that;
    - delta_ratio = ‖ΔW‖/‖W0‖, delta_norm = ‖ΔW‖.
    """
    bb, be, ee, bD, ss, sD, bs, DD, eD, ww = (sums[key] for key in STAT_KEYS)
    dd, dD = bb + 2 * bs + ss, bD + sD
    figures = dict.fromkeys(
        ("base_part", "slot_part", "base_residual", "slot_residual", "merge_kept", "merge_noise",
         "effective_scale", "residual", "divergence", "rounding", "delta_ratio"),
    )
    figures["delta_norm"] = math.sqrt(DD)
    if DD <= 0:
        return figures
    norm = math.sqrt(DD)
    scale, slot, kept = dD / DD, sD / DD, eD / DD
    base = be / ee if ee > 0 else 0.0
    figures.update(
        base_part=base,
        slot_part=slot,
        base_residual=_root(bb - base * be) / norm,
        slot_residual=_root(ss - slot * sD) / norm,
        merge_kept=kept,
        merge_noise=_root(ee - kept * eD) / norm,
        effective_scale=scale,
        residual=_root(dd - scale * dD) / norm,
        divergence=_root(dd - 2 * dD + DD) / norm,
        rounding=eps * math.sqrt(ww) / norm,
        delta_ratio=norm / math.sqrt(ww) if ww > 0 else None,
    )
    return figures


def _root(value: float) -> float:
    """sqrt of a difference of sums that is ≥ 0 in exact arithmetic."""
    return math.sqrt(max(value, 0.0))


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
