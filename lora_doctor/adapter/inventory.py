"""One inventory of what PEFT wrote into an adapter file, and one of a base model's weights.

Every caller (checkpoint resolution, pre-flight, ΔW, the sync, the audit, the name map) asks these
instead of listing the files itself. Both are read from safetensors headers alone; tensors are
read only when a caller asks for them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..errors import BadInput
from .spec import ADAPTER_CONFIG  # noqa: F401 (re-exported: its one home is spec.py)
from .weight_files import TensorInfo, model_tensors, read_header, read_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's key prefix in a saved adapter: the wrapper's `base_model.model.` around the trainer's model.
PEFT_PREFIX = "base_model.model."
LINEAR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
EMBEDDING_SUFFIXES = {".lora_embedding_A": "A", ".lora_embedding_B": "B"}
# PEFT's trainable tokens (`trainable_token_indices`): the new values of some embedding rows.
TRAINABLE_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
# Module names of a causal LM's input embedding and output head, as transformers' model classes name them.
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OUTPUT_NAMES = ("lm_head", "embed_out")


@dataclass
class AdapterInventory:
    """An adapter file's tensors, sorted by what PEFT wrote them for (module names without PEFT's prefix)."""

    file: Path
    linear: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # module → {"A", "B"}
    embedding: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # module → {"A", "B"}
    magnitude: list[TensorInfo] = field(default_factory=list)  # DoRA
    saved_base_layers: list[TensorInfo] = field(default_factory=list)  # `*.base_layer.weight` (save_embedding_layers)
    base_layer_bias: list[TensorInfo] = field(default_factory=list)  # bias="all"/"lora_only"
    full_modules: dict[str, list[TensorInfo]] = field(default_factory=dict)  # trained full copies (modules_to_save)
    trainable_tokens: dict[str, TensorInfo] = field(default_factory=dict)  # module → rows' new values
    other: list[TensorInfo] = field(default_factory=list)

    @property
    def lora_modules(self) -> dict[str, dict[str, TensorInfo]]:
        return {**self.linear, **self.embedding}

    @property
    def lora_dtypes(self) -> list[str]:
        """The dtypes the LoRA factors are stored in, sorted."""
        return sorted({t.dtype_name for factors in self.lora_modules.values() for t in factors.values()})

    @property
    def tensors(self) -> list[TensorInfo]:
        pairs = [t for factors in self.lora_modules.values() for t in factors.values()]
        full = [t for group in self.full_modules.values() for t in group]
        tokens = list(self.trainable_tokens.values())
        return pairs + self.magnitude + self.saved_base_layers + self.base_layer_bias + full + tokens + self.other

    def trained_copies(self) -> dict[str, TensorInfo]:
        """Whole tensors the file holds beside the LoRA factors (`modules_to_save`), by base weight name:
        a merge writes them in place of the base's."""
        copies = {}
        for group in self.full_modules.values():
            for t in group:
                name = t.name.removeprefix(PEFT_PREFIX)
                copies[name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = t
        return copies

    def floating(self) -> dict[str, torch.Tensor]:
        """The values of every floating-point tensor of the file, by key (read once: one open)."""
        return self.read([t for t in self.tensors if t.dtype.is_floating_point])

    def nonfinite(self, values: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[int, int]]:
        """Tensors holding NaN or Inf values (key without PEFT's prefix → (NaN count, Inf count));
        `values`: `floating()`'s, when the caller has read them."""
        found = {}
        for key, value in (self.floating() if values is None else values).items():
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            if nan or inf:
                found[key.removeprefix(PEFT_PREFIX)] = (nan, inf)
        return found

    def untrained(self, values: dict[str, torch.Tensor] | None = None) -> bool:
        """Every LoRA B is zero (PEFT's initialization: step 0, or a run that never trained): ΔW = 0 on
        every module, and the file holds nothing else a merge would write. `values`: `floating()`'s,
        when the caller has read them."""
        if self.trainable_tokens or self.full_modules:
            return False
        b = [factors["B"] for factors in self.lora_modules.values() if "B" in factors]
        read = self.read(b) if values is None else {t.name: values[t.name] for t in b}
        return bool(b) and all(not bool(value.any()) for value in read.values())

    def read(self, tensors: list[TensorInfo]) -> dict[str, torch.Tensor]:
        """The values of some of this file's tensors, by key: read at the places the header gave, the
        file opened once and its header not parsed again (none opened for none)."""
        from ..errors import unreadable_safetensors

        try:
            return read_tensors(tensors) if tensors else {}
        except BadInput:
            raise
        except Exception as error:  # out of memory is the machine's, not the file's
            raise unreadable_safetensors(self.file, error) from None


def read_adapter(adapter_dir: Path) -> AdapterInventory:
    """The inventory of `adapter_dir`'s adapter file; `BadInput` when it is absent, unreadable or holds no LoRA."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise BadInput(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    inventory = AdapterInventory(weights)
    for info in read_header(weights).values():
        _classify(inventory, info)
    if not inventory.lora_modules:
        raise BadInput(f"{weights} holds no LoRA weights (no '*.lora_A.weight' or '*.lora_embedding_A' tensors)")
    return inventory


def _classify(inventory: AdapterInventory, tensor: TensorInfo) -> None:
    name = tensor.name.removeprefix(PEFT_PREFIX)
    for suffixes, bucket in ((LINEAR_SUFFIXES, inventory.linear), (EMBEDDING_SUFFIXES, inventory.embedding)):
        for suffix, kind in suffixes.items():
            if name.endswith(suffix):
                bucket.setdefault(name[: -len(suffix)], {})[kind] = tensor
                return
    if re.search(r"\.lora_magnitude_vector(\.weight)?$", name):
        inventory.magnitude.append(tensor)
    elif name.endswith(TRAINABLE_TOKENS_SUFFIX):
        inventory.trainable_tokens[name.removesuffix(TRAINABLE_TOKENS_SUFFIX)] = tensor
    elif name.endswith(".base_layer.weight"):
        inventory.saved_base_layers.append(tensor)
    elif name.endswith(".base_layer.bias"):
        inventory.base_layer_bias.append(tensor)
    elif ".modules_to_save." in name:
        inventory.full_modules.setdefault(name.split(".modules_to_save.")[0], []).append(tensor)
    elif name.endswith((".weight", ".bias")) and not re.search(r"\.lora_\w+\.", name):
        # PEFT saves a modules_to_save copy under the plain module name (e.g. `lm_head.weight`).
        inventory.full_modules.setdefault(name.rsplit(".", 1)[0], []).append(tensor)
    else:
        inventory.other.append(tensor)


@dataclass
class BaseInventory:
    """A base model folder's weights (through `model.safetensors.index.json` when there is one) and config."""

    folder: Path
    tensors: dict[str, TensorInfo]
    config: dict

    @property
    def text_config(self) -> dict:
        nested = self.config.get("text_config")
        return nested if isinstance(nested, dict) else {}

    @property
    def architecture(self) -> str:
        return str((self.config.get("architectures") or [""])[0])

    @cached_property
    def names(self):
        """The adapter's, the base's and the engine's names of every module of this base (names.NameMap),
        built once: everything that opened the base shares it."""
        from .names import NameMap, engine_naming

        return NameMap(self.tensors, engine_naming(self.architecture))

    @property
    def ties_embeddings(self) -> bool:
        return ties_embeddings(self.config)

    @property
    def dtype(self) -> str | None:
        """The dtype the config names, else the one most 2-D weights are stored in."""
        for source in (self.config, self.text_config):
            for key in ("dtype", "torch_dtype"):
                value = source.get(key)
                if isinstance(value, str) and value != "auto":
                    return value.removeprefix("torch.")
        counts = Counter(t.dtype_name for key, t in self.tensors.items() if key.endswith(".weight") and len(t.shape) == 2)
        return counts.most_common(1)[0][0] if counts else None

    def module_weight(self, module: str, names) -> TensorInfo | None:
        """The weight an adapter module applies to: the one vLLM gives the same engine name (`names`, the
        module's `names.ModuleNames`), else (a prefix mismatch) the one with the same path inside its
        block; an output head the model ties to its input embedding is that embedding."""
        key = names.base or names.nearest_base
        weight = self.tensors.get(key) if key else None
        if weight is None and module.rsplit(".", 1)[-1] in OUTPUT_NAMES and self.ties_embeddings:
            suffixes = tuple(f"{name}.weight" for name in EMBEDDING_NAMES)
            return next((t for k, t in self.tensors.items() if k.endswith(suffixes)), None)
        return weight

    def tied_head(self, module: str) -> bool:
        """`module` is an output head this base ties to its input embedding (no weight of its own)."""
        return module.rsplit(".", 1)[-1] in OUTPUT_NAMES and self.ties_embeddings and not any(
            key.endswith(f"{module.rsplit('.', 1)[-1]}.weight") for key in self.tensors
        )

    def embedding_key(self, module: str) -> str | None:
        """The base weight key of an embedding module (`model.embed_tokens`), or of the embedding a tied
        head is; None when the base has none."""
        if self.tied_head(module):
            suffixes = tuple(f"{name}.weight" for name in EMBEDDING_NAMES)
            return next((k for k in self.tensors if k.endswith(suffixes)), None)
        key = f"{module}.weight"
        return key if key in self.tensors else next((k for k in self.tensors if k.endswith(f".{key}")), None)


def folder_ties_embeddings(folder: Path) -> bool:
    """Whether the model in `folder` (an export) ties its head to its embedding, by its config.json;
    False when it has none or it cannot be read (then an absent lm_head reads as absent)."""
    try:
        return ties_embeddings(read_json(Path(folder) / "config.json"))
    except BadInput:
        return False


def ties_embeddings(config: dict) -> bool:
    """The output head is the input embedding (`tie_word_embeddings`, on the config or its text config)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    return bool(value) if value is not None else False


def read_base(folder: Path) -> BaseInventory:
    """The inventory of a local base model folder; `BadInput` when it has no readable weights or config."""
    folder = Path(folder)
    return BaseInventory(folder, model_tensors(folder), read_json(folder / "config.json"))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} does not hold a JSON object")
    return data

