"""ΔW of a PEFT LoRA adapter, with PEFT's exact scaling, and what a merge in a given dtype holds. No vLLM import."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import BadInput
from .base_slices import BaseSlices
from .checkpoint import Checkpoint, spec_from_config
from .inventory import ADAPTER_CONFIG, AdapterInventory, BaseInventory, read_adapter, read_json
from .modules import layer_index
from .spec import LoraSpec
from .weight_files import StreamedWeights, TensorInfo, layer_by_layer, read_tensor, read_tensors


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
            return (self.B[cols].to(dtype) @ self.A[:, rows].to(dtype)).mul_(self.scaling).T
        return (self.B[rows].to(dtype) @ self.A[:, cols].to(dtype)).mul_(self.scaling)


def merge_in_dtype(w0: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a trainer's merge `W0 + ΔW` holds when its weights live in `dtype`.

    PEFT's `merge` computes ΔW in float32 and casts it to the weight's dtype, then adds it in place:
    round(round(W0) + round(ΔW)). In bf16 every part of ΔW below half an ulp of W0 is lost, so a
    merged sync in bf16 is expected to hold this, not the exact W0 + ΔW.
    """
    return (w0.to(dtype) + delta.to(dtype)).to(dtype)


class MergedWeights:
    """The weights of a merged sync, `W0 + scale·ΔW` as a trainer whose weights live in `dtype` merges
    them (`merge_in_dtype`), as (base key, float32 value), one base weight at a time.

    Each W0 is read from the base's files and each ΔW formed from its LoRA factors only when the
    weight's turn comes, so the push holds one module's tensors, not a copy of the model or a dense ΔW
    per module. Iterable any number of times and small to pickle (paths and LoRA factors), as
    `StreamedWeights`.

    `factors` are `load_merge_factors`'s (by base key); `trained_copies` replace the base's weight
    (`modules_to_save`: the merge writes the trained copy in its place); `decoder_layers` limits the
    merge to some decoder layers; `cycles` merge/unmerge rounds before the final merge are the rounding
    drift of trl #6688.
    """

    def __init__(
        self,
        tensors: dict[str, TensorInfo],
        factors: dict[str, LoraFactors],
        dtype: torch.dtype,
        scale: float = 1.0,
        decoder_layers: set[int] | None = None,
        cycles: int = 0,
        trained_copies: dict[str, torch.Tensor] | None = None,
    ):
        self.base = StreamedWeights(tensors)
        self.factors = factors
        self.dtype = dtype
        self.scale = scale
        self.decoder_layers = decoder_layers
        self.cycles = cycles
        self.trained_copies = trained_copies or {}

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, info in layer_by_layer(self.base.tensors):
            # No local name for W0: it is freed once merged, not kept while the engine takes the result.
            copy = self.trained_copies.get(name)
            yield name, self.merged(name, copy if copy is not None else read_tensor(info))

    def merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """What the trainer's merge holds in place of `weight` (base key `name`), in float32."""
        held = weight.to(self.dtype)
        lora = self.factors.get(name)
        if lora is not None and (self.decoder_layers is None or layer_index(name) in self.decoder_layers):
            step = lora.delta().mul_(self.scale)  # in place: one ΔW-sized tensor, not two
            if self.cycles:
                rounded = step.to(self.dtype)
                for _ in range(self.cycles):
                    held = (held + rounded) - rounded  # each op rounds to `dtype`
            held = merge_in_dtype(held, step, self.dtype)
        return held.float()


class OpenedAdapter(NamedTuple):
    """An adapter folder's config, validated spec and inventory (headers), read once."""

    adapter_dir: Path
    config: dict
    spec: LoraSpec
    inventory: AdapterInventory


def opened(adapter: str | Path | Checkpoint | OpenedAdapter) -> OpenedAdapter:
    """An adapter's folder, config, spec and inventory: those a `Checkpoint` already holds, else read
    from the folder `adapter`."""
    if isinstance(adapter, OpenedAdapter):
        return adapter
    if isinstance(adapter, Checkpoint):
        return OpenedAdapter(adapter.adapter_dir, adapter.config, adapter.spec, adapter.adapter())
    adapter_dir = Path(adapter)
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    return OpenedAdapter(adapter_dir, config, spec_from_config(config, adapter_dir), read_adapter(adapter_dir))


@dataclass(frozen=True)
class FactorRef:
    """Where one linear module's LoRA factors sit in the adapter file, and PEFT's scaling of them: the
    one description every ΔW of lora-doctor is formed from (`load`). Small to pickle (places, not
    values): an engine's workers receive it and read the two tensors' bytes alone."""

    module: str  # the adapter's name of the module
    A: TensorInfo
    B: TensorInfo
    scaling: float
    fan_in_fan_out: bool = False

    def load(self, values: dict[str, torch.Tensor]) -> LoraFactors:
        """The factors, their values taken from `values` (by tensor key: `load_factors` reads them)."""
        return LoraFactors(A=values[self.A.name], B=values[self.B.name], scaling=self.scaling, fan_in_fan_out=self.fan_in_fan_out)


def factor_refs(adapter: str | Path | Checkpoint | OpenedAdapter) -> dict[str, FactorRef]:
    """Adapter module name → where its linear LoRA factors are and their scaling (rank and alpha
    patterns, rsLoRA, fan_in_fan_out from the validated spec)."""
    adapter_dir, _config, spec, inventory = opened(adapter)
    if spec.use_dora:
        raise BadInput(f"{adapter_dir}: DoRA adapters are not supported (ΔW is not scaling·B·A)")
    return {
        module: FactorRef(module, factors["A"], factors["B"], spec.scaling_for(module), spec.fan_in_fan_out)
        for module, factors in inventory.linear.items()
    }


def base_key(module: str, names) -> str:
    """The base weight an adapter module's ΔW applies to (`names`: the checkpoint's `names.NameMap`):
    an adapter may name a module otherwise than its base (a multimodal base saved as `model.layers.*`
    whose adapter says `model.language_model.layers.*`). The merge and the per-module read join on it."""
    return names.base_key(module) or f"{module}.weight"


def load_factors(refs: dict[str, FactorRef]) -> dict[str, LoraFactors]:
    """The factors `refs` place, by the same keys: ΔW's one form (`LoraFactors.delta`), each file opened once."""
    values = read_tensors([t for ref in refs.values() for t in (ref.A, ref.B)])
    return {key: ref.load(values) for key, ref in refs.items()}


def load_lora_factors(adapter: str | Path | Checkpoint | OpenedAdapter) -> dict[str, LoraFactors]:
    """Module name of the base model (e.g. "model.layers.0.self_attn.q_proj") → its LoRA factors, of an
    opened `Checkpoint` or adapter, or an adapter folder."""
    return load_factors(factor_refs(adapter))


def load_merge_factors(adapter: str | Path | Checkpoint, base: BaseInventory) -> dict[str, LoraFactors]:
    """Every ΔW a merge of the adapter writes into the base (PEFT's `merge_and_unload`), by the base's
    weight key: the linear LoRA modules', the input embedding's LoRA, the trainable tokens' rows, and the
    LoRA of an output head the base ties to its embedding (PEFT merges it into the one shared weight,
    so the embedding moves with it). Several of them on one weight are added, as successive merges do.

    An embedding's ΔW is `scaling·(B·A)ᵀ` (vocab × hidden: PEFT's `get_delta_weight` of an Embedding),
    the `fan_in_fan_out` layout; trainable tokens replace rows, a ΔW of rank k = the rows' number:
    one-hot rows of the vocabulary times (new rows − the base's)."""
    adapter_dir, config, spec, inventory = read = opened(adapter)
    names = base.names
    merged: dict[str, list[LoraFactors]] = {}
    for module, lora in load_lora_factors(read).items():
        if base.tied_head(module):
            key = base.embedding_key(module)
            lora = LoraFactors(A=lora.B.T, B=lora.A.T, scaling=lora.scaling, fan_in_fan_out=not lora.fan_in_fan_out)
        else:
            key = base_key(module, names)
        merged.setdefault(key, []).append(lora)
    values = inventory.read([t for factors in inventory.embedding.values() for t in factors.values()])
    for module, factors in inventory.embedding.items():
        lora = LoraFactors(A=values[factors["A"].name], B=values[factors["B"].name], scaling=spec.scaling_for(module), fan_in_fan_out=True)
        merged.setdefault(base.embedding_key(module) or f"{module}.weight", []).append(lora)
    tokens = inventory.read(list(inventory.trainable_tokens.values()))
    for module, info in inventory.trainable_tokens.items():
        key = base.embedding_key(module)
        if key is None:
            raise BadInput(f"{adapter_dir}: trainable tokens on {module}, which has no weight in base {base.folder}")
        indices = token_indices(config.get("trainable_token_indices"), module)
        rows = tokens[info.name].float()
        if len(indices) != rows.shape[0]:
            raise BadInput(f"{adapter_dir}: {rows.shape[0]} trainable token rows on {module} but {len(indices)} trainable_token_indices")
        embedding = base_rows(base, key, indices)
        one_hot = torch.zeros(len(indices), base.tensors[key].shape[0])
        one_hot[torch.arange(len(indices)), torch.tensor(indices)] = 1.0
        merged.setdefault(key, []).append(LoraFactors(A=one_hot, B=(rows - embedding).T, scaling=1.0, fan_in_fan_out=True))
    return {key: _concatenate(parts) for key, parts in merged.items()}


def token_indices(setting, module: str) -> list[int]:
    """The token ids PEFT's `trainable_token_indices` trains on `module`: a list (on the input
    embedding) or {module name or suffix: list}."""
    if isinstance(setting, dict):
        for name, indices in setting.items():
            if module == name or module.endswith(f".{name}"):
                return [int(i) for i in indices]
        return []
    return [int(i) for i in setting or []]


def base_rows(base: BaseInventory, key: str, indices: list[int]) -> torch.Tensor:
    """Some rows of one base weight, in float32 (only those rows are read, at the places the inventory
    gives: an embedding can be gigabytes)."""
    return BaseSlices(base.tensors).read(key.removesuffix(".weight"), list(indices), slice(None)).float()


def _concatenate(parts: list[LoraFactors]) -> LoraFactors:
    """One factorization of the sum of several ΔW on the same weight (ranks stacked, scalings folded in)."""
    if len(parts) == 1:
        return parts[0]
    layout = parts[0].fan_in_fan_out
    # Bring every part to the first one's layout: (B·A)ᵀ = Aᵀ·Bᵀ swaps the roles of the factors.
    same = [p if p.fan_in_fan_out == layout else LoraFactors(A=p.B.T, B=p.A.T, scaling=p.scaling, fan_in_fan_out=layout) for p in parts]
    return LoraFactors(
        A=torch.cat([p.A.float() for p in same]),
        B=torch.cat([p.B.float() * p.scaling for p in same], dim=1),
        scaling=1.0,
        fan_in_fan_out=layout,
    )
