"""What every pre-flight check reads: the opened checkpoint's spec, inventories and name map."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..adapter.checkpoint import LoraSpec
from ..adapter.inventory import AdapterInventory, BaseInventory
from ..adapter.names import ModuleNames, NameMap
from ..adapter.weight_files import TensorInfo


@dataclass
class Context:
    """The opened checkpoint's facts, as every check reads them: the validated spec, the inventories,
    the name map; `config` is adapter_config.json as written, for the fields only a refusal reads
    (lora_bias, init_lora_weights, the features vLLM rejects), which the spec does not carry."""

    spec: LoraSpec
    config: dict
    adapter: AdapterInventory
    base: BaseInventory
    max_lora_rank: int | None
    names: NameMap

    @property
    def adapter_dir(self) -> Path:
        return self.adapter.file.parent

    @property
    def base_dir(self) -> Path:
        return self.base.folder

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.base.config.get("architectures") or ())

    @cached_property
    def values(self) -> dict[str, torch.Tensor]:
        """The adapter's floating-point tensors, read once for the checks of their values."""
        return self.adapter.floating()

    @cached_property
    def module_names(self) -> dict[str, ModuleNames]:
        """Every adapter module in the three vocabularies (adapter, base, engine)."""
        return {module: self.names.resolve(module) for module in self.adapter.lora_modules}

    def base_weight(self, module: str) -> TensorInfo | None:
        return self.base.module_weight(module, self.module_names.get(module) or self.names.resolve(module))
