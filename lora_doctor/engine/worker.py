"""vLLM worker extension: read what each LoRA-wrapped linear layer of the engine holds — its base
weight and its loaded adapter slot, apart — against W0 and ΔW from the checkpoint on disk.

Loaded in every worker via `LLM(..., worker_extension_cls="lora_doctor.engine.worker.LoraDoctorWorker")`
and called with `llm.collective_rpc(method_name, args=(...))`, which returns one result per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
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

from ..adapter.inventory import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseInventory, read_base
from ..adapter.lora_delta import LoraFactors, load_lora_factors, merge_in_dtype, opened
from ..adapter.names import NameMap, engine_naming
from ..adapter.weight_files import give_back_freed_memory
from ..errors import BadInput, EnvironmentProblem
from ..measure.layer_figures import STAT_KEYS
from .capture import PromptLogprobCapture

# Weights are streamed in column blocks of at most this many elements per matrix, so memory stays
# bounded on large layers: a block lives as ~10 float64 arrays (base, slot, W0, ΔW, the merge and
# their products), 80 MB at 2**20 elements (it was 2**22: 0.3 GB at the read's peak).
_BLOCK_ELEMENTS = 1 << 20

# Adapters whose config and header a worker keeps (a check reads two: its own and --previous).
_ADAPTERS_KEPT = 4

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

    def lora_doctor_layer_stats(
        self,
        base_dir: str,
        adapter_dir: str,
        lora_int_id: int | None,
        return_tensors: bool = False,
    ) -> list[dict]:
        """Sufficient statistics of the engine's base weight and LoRA slot against ΔW for every
        checkpoint sub-module on this rank: one dict per (module, shard) with its placement in the
        full matrix, the float64 sums of `lora_delta.STAT_KEYS`, "slot": the LoRA slot holding
        `lora_int_id` (None if it is in none: no adapter term) and, if asked, "weight": the local
        shard of base + slot (float32, out_size × in_size)."""
        model = self.model_runner.get_model()
        manager = model.lora_manager
        if self.model_runner.lora_config.fully_sharded_loras:
            raise EnvironmentProblem(f"the per-module read does not support fully sharded LoRA layers; {_LOGITS_ONLY}")
        slots = manager.lora_index_to_id
        slot = slots.index(lora_int_id) if lora_int_id is not None and lora_int_id in slots else None
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        # Renames only, as vLLM's own LoRA loader does: stacking would turn q_proj into qkv_proj.
        base = _BaseWeights(self._lora_doctor_base(base_dir).tensors, mapper.get_rename_mapper() if mapper else None)
        factors, adapter_names = self._lora_doctor_factors(base_dir, adapter_dir)
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
        for result in results:
            result["module"] = adapter_names.get(result["module"], result["module"])
        return results

    def _lora_doctor_base(self, base_dir: str) -> BaseInventory:
        """The base's inventory (its config and weights' headers), read once per engine: the engine serves this base."""
        cache = self.__dict__.setdefault("_lora_doctor_bases", {})
        if base_dir not in cache:
            cache[base_dir] = read_base(Path(base_dir))
        return cache[base_dir]

    def _lora_doctor_factors(self, base_dir: str, adapter_dir: str) -> tuple[dict[str, LoraFactors], dict[str, str]]:
        """An adapter's factors keyed by the base's module names, and the adapter's name of each. Its
        config and header are read once per engine and adapter, again only when its files changed (a
        trainer rewrites its adapter folder in place); the factors' values at every call (not kept)."""
        folder = Path(adapter_dir)
        stamp = tuple(_stamp(folder / name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
        cache = self.__dict__.setdefault("_lora_doctor_adapters", {})
        if adapter_dir not in cache or cache[adapter_dir][0] != stamp:
            # A trainer's engine lives for the whole run and a probe snapshots each step's adapter into
            # a folder of its own: keep the few a check reads (its adapter and --previous), not all.
            while len(cache) >= _ADAPTERS_KEPT:
                cache.pop(next(iter(cache)))
            cache[adapter_dir] = (stamp, opened(folder))
        base = self._lora_doctor_base(base_dir)
        names = NameMap(base.tensors, engine_naming(base.architecture))
        # The shards are named by the base checkpoint, the factors by the adapter: join them on the
        # base's names, then report in the adapter's (the reference's and the report's vocabulary).
        factors, adapter_names = {}, {}
        for module, lora in load_lora_factors(cache[adapter_dir][1]).items():
            base_name = (names.base_key(module) or f"{module}.weight").removesuffix(".weight")
            factors[base_name] = lora
            adapter_names[base_name] = module
        return factors, adapter_names


def _stamp(path: Path) -> tuple | None:
    """What changes when a file is rewritten or replaced (None: absent; the read then says why)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class _Shard:
    """Where rows [row_start, row_start + out_size) of a layer's local output sit in a
    checkpoint sub-module's full weight matrix."""

    module: str  # vLLM name; mapped to the checkpoint's name by _BaseWeights
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
    base: _BaseWeights,
    factors: dict[str, LoraFactors],
    return_tensors: bool,
) -> list[dict]:
    """Stream the layer's local weight in column blocks and accumulate each shard's sums
    (`lora_delta.STAT_KEYS`): the base weight and the adapter slot are read apart."""
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


class _BaseWeights:
    """Slices of the base model's weights, read straight from its safetensors files."""

    def __init__(self, tensors: dict, mapper=None):
        self._files = {name: info.path for name, info in tensors.items()}
        # vLLM module name → checkpoint module name, for models that rename weights on load.
        self._names = {}
        for key in self._files:
            if key.endswith(".weight"):
                mapped = mapper.map_name(key) if mapper is not None else key
                if mapped is not None:
                    self._names[mapped.removesuffix(".weight")] = key.removesuffix(".weight")
        self._handles = {}

    def checkpoint_name(self, module: str) -> str:
        if module not in self._names:
            raise BadInput(f"the base checkpoint has no weight for the engine's module {module}")
        return self._names[module]

    def shape(self, module: str) -> tuple[int, int]:
        return tuple(self._slice(module).get_shape())

    def read(self, module: str, rows: slice, cols: slice) -> torch.Tensor:
        return self._slice(module)[rows, cols]

    def release(self) -> None:
        """Close the files read so far: the pages of a memory-mapped file stay in the process's RSS
        while it is open, so a read that kept them open would end up holding the whole base."""
        self._handles.clear()

    def _slice(self, module: str):
        file = self._files[f"{module}.weight"]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_slice(f"{module}.weight")
