"""vLLM worker extension: read what each LoRA-wrapped linear layer of the engine holds — its base
weight and its loaded adapter slot, apart — against W0 and ΔW from the checkpoint on disk, at the places
the opened checkpoint gives it (`worker_contract.LayerRead`: no config or header is read here).

Loaded in every worker via `LLM(..., worker_extension_cls="lora_doctor.engine.worker.LoraDoctorWorker")`
and called with `llm.collective_rpc(method_name, args=(...))`, which returns one result per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from ..adapter.base_slices import BaseSlices
from ..adapter.lora_delta import LoraFactors, load_factors, merge_in_dtype
from ..adapter.weight_files import give_back_freed_memory
from ..errors import EnvironmentProblem
from .capture import PromptLogprobCapture
from .worker_contract import STAT_KEYS, from_wire

# Weights are streamed in column blocks of at most this many elements per matrix, so memory stays
# bounded on large layers: a block lives as ~10 float64 arrays (base, slot, W0, ΔW, the merge and
# their products), 80 MB at 2**20 elements (it was 2**22: 0.3 GB at the read's peak).
_BLOCK_ELEMENTS = 1 << 20

# The way out when the per-module read cannot place an engine layout: the logit figures still work.
_LOGITS_ONLY = "run with --no-module-read for the logit figures only"


class LoraDoctorWorker(PromptLogprobCapture):
    """Mixed into vLLM's worker class: `self.model_runner` is the worker's model runner."""

    def lora_doctor_modules(self) -> dict:
        """This rank's LoRA-wrapped modules (name → layer class), the model's packed mapping,
        the adapter id in each LoRA slot (None: free) and the ids of all registered adapters.

        An engine built without `enable_lora` (TRL's colocated engine: it syncs merged weights) has
        no LoRA manager: no wrapped modules, no slots, `lora_enabled` False.
        """
        model = self.model_runner.get_model()
        manager = getattr(model, "lora_manager", None)
        return {
            "rank": get_tensor_model_parallel_rank(),
            "world_size": get_tensor_model_parallel_world_size(),
            "lora_enabled": manager is not None,
            "modules": {name: type(layer).__name__ for name, layer in manager.modules.items()} if manager is not None else {},
            "packed_modules_mapping": {k: list(v) for k, v in _packed_mapping(model).items()},
            "slots": list(manager.lora_index_to_id) if manager is not None else [],
            "registered_adapters": sorted(manager.list_adapters()) if manager is not None else [],
        }

    def lora_doctor_layer_stats(self, request: dict, lora_int_id: int | None, return_tensors: bool = False) -> list[dict]:
        """Sufficient statistics of the engine's base weight and LoRA slot against ΔW for every
        checkpoint sub-module on this rank: one dict per (module, shard) with its placement in the
        full matrix, the float64 sums of `worker_contract.STAT_KEYS`, "slot": the LoRA slot holding
        `lora_int_id` (None if it is in none: no adapter term) and, if asked, "weight": the local
        shard of base + slot (float32, out_size × in_size). `request` (`worker_contract.to_wire` of a
        `LayerRead`) says where the base's weights and the adapter's factors are; the factors' values
        are read at every call (not kept)."""
        request = from_wire(request)
        model = self.model_runner.get_model()
        manager = model.lora_manager
        if self.model_runner.lora_config.fully_sharded_loras:
            raise EnvironmentProblem(f"the per-module read does not support fully sharded LoRA layers; {_LOGITS_ONLY}")
        slots = manager.lora_index_to_id
        slot = slots.index(lora_int_id) if lora_int_id is not None and lora_int_id in slots else None
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        # Renames only, as vLLM's own LoRA loader does: stacking would turn q_proj into qkv_proj.
        rename = mapper.get_rename_mapper() if mapper else None
        base = BaseSlices(request.base_tensors, rename.map_name if rename is not None else None)
        factors = load_factors(request.factors)
        packed = _packed_mapping(model)
        results = []
        for name, layer in manager.modules.items():
            if isinstance(layer, BaseLinearLayerWithLoRA):
                shards = _shards(name, layer, packed)
                results += _shard_stats(layer, slot, shards, base, factors, return_tensors)
                base.release()
                # The module's blocks, freed, fragment glibc's heap across modules of other shapes:
                # +0.27 GB on the 242M model of bench/check_model_scale.py without this, +0.13 with it.
                give_back_freed_memory()
        # The shards are named by the base checkpoint, the factors by the adapter: report in the
        # adapter's names (the reference's and the report's vocabulary).
        for result in results:
            ref = request.factors.get(result["module"])
            result["module"] = ref.module if ref is not None else result["module"]
        return results


@dataclass(frozen=True)
class _Shard:
    """Where rows [row_start, row_start + out_size) of a layer's local output sit in a
    checkpoint sub-module's full weight matrix."""

    module: str  # vLLM name; mapped to the checkpoint's name by BaseSlices
    row_start: int
    out_size: int
    out_offset: int
    in_offset: int
    in_size: int


def _packed_mapping(model) -> dict[str, list[str]]:
    return dict(getattr(model, "packed_modules_mapping", {}) or {})


def _shards(name: str, layer, packed: dict[str, list[str]]) -> list[_Shard]:
    """Split a LoRA-wrapped layer's local weight into its checkpoint sub-modules."""
    parent, _, leaf = name.rpartition(".")
    prefix = f"{parent}." if parent else ""
    in_size = layer.input_size
    if isinstance(layer, RowParallelLinearWithLoRA):
        return [_Shard(name, 0, layer.output_size, 0, layer.tp_rank * in_size, in_size)]
    if isinstance(layer, ReplicatedLinearWithLoRA):
        return [_Shard(name, 0, layer.output_size, 0, 0, in_size)]
    if isinstance(layer, MergedColumnParallelLinearWithLoRA):
        subs = packed.get(leaf, [])
        if len(subs) != layer.n_slices:
            raise EnvironmentProblem(f"{name}: {layer.n_slices} LoRA slices but packed mapping {subs}; {_LOGITS_ONLY}")
        shards, row = [], 0
        # output_ids is the shard index of each slice: tp_rank, or tp_rank // replicas for
        # replicated kv heads (then several ranks hold the same k/v rows).
        for sub, size, shard_id in zip(subs, layer.output_slices, layer.output_ids):
            shards.append(_Shard(prefix + sub, row, size, shard_id * size, 0, in_size))
            row += size
        return shards
    if isinstance(layer, QKVParallelLinearWithLoRA):
        # q, k and v fused in one checkpoint weight (e.g. Phi-3): three row bands per rank.
        q, kv = layer.q_proj_shard_size, layer.kv_proj_shard_size
        kv_id = layer.tp_rank // layer.base_layer.num_kv_head_replicas
        k_start = layer.q_proj_total_size
        v_start = k_start + layer.kv_proj_total_size
        return [
            _Shard(name, 0, q, layer.tp_rank * q, 0, in_size),
            _Shard(name, q, kv, k_start + kv_id * kv, 0, in_size),
            _Shard(name, q + kv, kv, v_start + kv_id * kv, 0, in_size),
        ]
    if type(layer) is ColumnParallelLinearWithLoRA:
        size = layer.output_size
        if not layer.is_merged_col_linear:
            return [_Shard(name, 0, size, layer.tp_rank * size, 0, in_size)]
        # gate and up fused in one checkpoint weight (e.g. Phi-3): each rank holds a band of each half.
        half = size // 2
        return [
            _Shard(name, 0, half, layer.tp_rank * half, 0, in_size),
            _Shard(name, half, half, (layer.tp_size + layer.tp_rank) * half, 0, in_size),
        ]
    raise EnvironmentProblem(f"the per-module read does not know {type(layer).__name__} ({name}); {_LOGITS_ONLY}")


def _shard_stats(
    layer,
    slot: int | None,
    shards: list[_Shard],
    base: BaseSlices,
    factors: dict[str, LoraFactors],
    return_tensors: bool,
) -> list[dict]:
    """Stream the layer's local weight in column blocks and accumulate each shard's sums
    (`worker_contract.STAT_KEYS`): the base weight and the adapter slot are read apart."""
    names = [base.checkpoint_name(s.module) for s in shards]
    full_shapes = [base.shape(n) for n in names]
    sums = [dict.fromkeys(STAT_KEYS, 0.0) for _ in shards]
    blocks: list[list[torch.Tensor]] = [[] for _ in shards]
    # The engine rounds W0 to its own dtype when it loads it: that rounding is no sync's doing.
    dtype = layer.base_layer.params_dtype
    in_size = layer.input_size
    width = max(1, _BLOCK_ELEMENTS // max(in_size, sum(layer.output_slices)))
    for col in range(0, in_size, width):
        cols = slice(col, min(col + width, in_size))
        base_cols = _base_columns(layer, cols).double().cpu()
        slot_cols = _slot_columns(layer, slot, cols)
        for i, (shard, name) in enumerate(zip(shards, names)):
            band = slice(shard.row_start, shard.row_start + shard.out_size)
            rows = slice(shard.out_offset, shard.out_offset + shard.out_size)
            disk_cols = slice(shard.in_offset + cols.start, shard.in_offset + cols.stop)
            w0 = base.read(name, rows, disk_cols)
            w0_d = w0.to(dtype).double()
            lora = factors.get(name)
            delta = lora.delta(rows, disk_cols, torch.float64) if lora is not None else torch.zeros_like(w0_d)
            vectors = {
                "b": base_cols[band] - w0_d,
                "s": slot_cols[band] if slot_cols is not None else torch.zeros_like(w0_d),
                "D": delta,
                "e": merge_in_dtype(w0, delta, dtype).double() - w0_d,
                "w": w0_d,
            }
            for key in STAT_KEYS:
                sums[i][key] += float(torch.sum(vectors[key[0]] * vectors[key[1]]))
            if return_tensors:
                blocks[i].append((vectors["b"] + w0_d + vectors["s"]).float())
    results = []
    for i, (shard, name, (out_features, in_features)) in enumerate(zip(shards, names, full_shapes)):
        result = {
            "module": name,
            "rank": layer.tp_rank,
            "world_size": layer.tp_size,
            "out_offset": shard.out_offset,
            "out_size": shard.out_size,
            "in_offset": shard.in_offset,
            "in_size": shard.in_size,
            "out_features": out_features,
            "in_features": in_features,
            **sums[i],
            # The spacing of the engine's floats relative to their size: one ulp ≤ eps·|w|.
            "eps": torch.finfo(dtype).eps,
            "slot": slot,
        }
        if return_tensors:
            result["weight"] = torch.cat(blocks[i], dim=1)
        results.append(result)
    return results


def _slot_columns(layer, slot: int | None, cols: slice) -> torch.Tensor | None:
    """Columns `cols` of what the layer's LoRA slot adds to its output (float64 on CPU, shape
    (local out, len(cols))); None when the phase generates without an adapter."""
    if slot is None:
        return None
    # vLLM folds the scaling into B, so B_slot @ A_slot is the full adapter term.
    return torch.cat(
        [b[slot, 0].double().cpu() @ a[slot, 0, :, cols].double().cpu() for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked)]
    )


def _base_columns(layer, cols: slice) -> torch.Tensor:
    """Columns `cols` of the wrapped base layer's local weight."""
    base_layer = layer.base_layer
    if isinstance(base_layer.quant_method, UnquantizedLinearMethod) and base_layer.weight.numel() > 0:
        return base_layer.weight[:, cols]
    # Quantized weights, and the CPU backend's (which repacks them at load time and empties
    # layer.weight), are only reachable through the layer's own linear method: I·Wᵀ = Wᵀ.
    n = cols.stop - cols.start
    eye = torch.zeros(n, layer.input_size, dtype=base_layer.params_dtype, device=layer.device)
    eye[torch.arange(n), torch.arange(cols.start, cols.stop)] = 1
    return base_layer.quant_method.apply(base_layer, eye, None).T
