"""Open a LoRA checkpoint once: its validated spec, its adapter inventory, its base model's inventory and
config, and the name map between them, each read once and kept by one `Checkpoint` that every part of a
check is handed (pre-flight, the checker, the sync, the measurer, the reference, the audit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import BadInput
from .inventory import ADAPTER_WEIGHTS, AdapterInventory, BaseInventory, read_adapter, read_base, read_json
from .spec import ADAPTER_CONFIG, PEFT_DEFAULT_ALPHA, LoraSpec, pattern_key, spec_from_config

__all__ = ["ADAPTER_CONFIG", "PEFT_DEFAULT_ALPHA", "Checkpoint", "LoraSpec", "adapter_spec", "load_checkpoint", "open_checkpoint", "pattern_key", "spec_from_config"]

# The checkpoint's facts in the check's JSON report, in its order (docs/json-report.md).
REPORTED = ("path", "base_model", "base_path", "r", "lora_alpha", "use_rslora", "scaling", "target_modules")
# And in the pre-flight's (`lora-doctor inspect --json`), in its order.
DETAILED = (
    "path", "base_path", "base_model", "architectures", "r", "lora_alpha", "use_rslora", "scaling", "target_modules",
    "max_rank", "lora_modules", "adapter_dtype", "base_dtype",
)
# What tells two base models apart when their folders differ (a copy of the same model agrees on all).
BASE_IDENTITY = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")


@dataclass(frozen=True)
class Checkpoint:
    """A PEFT adapter folder and the local base model it applies to, each file read once: the
    inventories and the name map are read on first use and kept."""

    adapter_dir: Path
    base_dir: Path
    base_model: str
    spec: LoraSpec
    module_names: list[str]
    config: dict = field(default_factory=dict, compare=False, repr=False)  # adapter_config.json as written

    def adapter(self) -> AdapterInventory:
        return self.adapter_inventory

    def base(self) -> BaseInventory:
        return self.base_inventory

    @cached_property
    def adapter_inventory(self) -> AdapterInventory:
        return read_adapter(self.adapter_dir)

    @cached_property
    def base_inventory(self) -> BaseInventory:
        return read_base(self.base_dir)

    @property
    def names(self):
        """The adapter's, the base's and the engine's names of every module (the base's names.NameMap)."""
        return self.base_inventory.names

    def check_fits_base(self) -> None:
        """`BadInput` unless every LoRA module has both factors and a base weight of their shape
        (checked once: a checkpoint that fits keeps fitting)."""
        self._fits_base  # noqa: B018 (the property raises, or records that it fits)

    @cached_property
    def _fits_base(self) -> bool:
        adapter = self.adapter_inventory
        incomplete = sorted(m for m, factors in adapter.lora_modules.items() if set(factors) != {"A", "B"})
        if incomplete:
            raise BadInput(f"{adapter.file}: {incomplete[0]} has lora_A or lora_B but not both")
        check_fits_base(adapter, self.base_inventory)
        return True

    def summary(self, detailed: bool = False) -> dict:
        """The checkpoint as the reports record it, built here alone: the check's JSON report takes
        `REPORTED`; `detailed` (the pre-flight's, `lora-doctor inspect`) adds the architecture, the
        largest rank, the module count and the dtypes."""
        spec = self.spec
        facts = {
            "path": str(self.adapter_dir),
            "base_path": str(self.base_dir),
            "base_model": self.base_model,
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "use_rslora": spec.use_rslora,
            "scaling": spec.scaling,
            "target_modules": spec.target_modules,
        }
        if not detailed:
            return {key: facts[key] for key in REPORTED}
        adapter, base = self.adapter_inventory, self.base_inventory
        adapter_dtypes = adapter.lora_dtypes
        facts.update(
            architectures=list(base.config.get("architectures") or ()),
            max_rank=spec.max_rank,
            lora_modules=len(adapter.lora_modules),
            adapter_dtype=adapter_dtypes[0] if len(adapter_dtypes) == 1 else adapter_dtypes,
            base_dtype=base.dtype,
        )
        return {key: facts[key] for key in DETAILED}

    @property
    def tokenizer_dir(self) -> Path:
        """Trainers save the tokenizer beside the adapter; fall back to the base's."""
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (self.adapter_dir / name).is_file():
                return self.adapter_dir
        return self.base_dir


def open_checkpoint(path: str | Path | Checkpoint, base: str | Path | None = None) -> Checkpoint:
    """Find the adapter in `path`, validate its config (every bad field is `BadInput`) and resolve its
    base; nothing is loaded. A `Checkpoint` is returned as it is (it was opened with its base)."""
    if isinstance(path, Checkpoint):
        return path
    adapter_dir = find_adapter_dir(Path(path))
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    spec = spec_from_config(config, adapter_dir)
    base_model = str(base) if base is not None else spec.base_model_name_or_path or ""
    checkpoint = _opened(adapter_dir, config, spec, base_model, resolve_base(base_model, adapter_dir, explicit=base is not None))
    checkpoint.base_inventory  # noqa: B018 (read now, once: every part of a check asks for it)
    return checkpoint


def _opened(adapter_dir: Path, config: dict, spec: LoraSpec, base_model: str, base_dir: Path) -> Checkpoint:
    checkpoint = Checkpoint(adapter_dir=adapter_dir.resolve(), base_dir=base_dir.resolve(), base_model=base_model, spec=spec, module_names=[], config=config)
    object.__setattr__(checkpoint, "module_names", sorted(checkpoint.adapter_inventory.linear))
    return checkpoint


def load_checkpoint(path: str | Path | Checkpoint, base: str | Path | None = None) -> Checkpoint:
    """`open_checkpoint`, and check that the adapter fits its base (`BadInput` when it does not)."""
    checkpoint = open_checkpoint(path, base)
    checkpoint.check_fits_base()
    return checkpoint


def load_previous(path: str | Path | Checkpoint, checkpoint: Checkpoint) -> Checkpoint:
    """An older state of `checkpoint`'s adapter, opened on `checkpoint`'s base. When its own config names
    a base that is a local folder, that base must be the same model: an adapter trained on another base
    is no earlier state of this run (`BadInput` naming both)."""
    if isinstance(path, Checkpoint):
        previous = path
    else:
        adapter_dir = find_adapter_dir(Path(path))
        config = read_json(adapter_dir / ADAPTER_CONFIG)
        spec = spec_from_config(config, adapter_dir)
        own = _local_base(spec.base_model_name_or_path, adapter_dir)
        if own is not None and own.resolve() != checkpoint.base_dir:
            theirs, ours = read_json(own / "config.json"), checkpoint.base_inventory.config
            differ = [key for key in BASE_IDENTITY if theirs.get(key) != ours.get(key)]
            if differ:
                key = differ[0]
                raise BadInput(
                    f"--previous {adapter_dir.resolve()} was trained on base {own.resolve()} ({key} {theirs.get(key)!r}), not on "
                    f"{checkpoint.base_dir} ({key} {ours.get(key)!r}), the base of {checkpoint.adapter_dir}: pass an older checkpoint of the same run"
                )
        previous = _opened(adapter_dir, config, spec, str(checkpoint.base_dir), checkpoint.base_dir)
        # The same base, read once: the previous state shares the checkpoint's inventory (and its name map).
        previous.__dict__.update(base_inventory=checkpoint.base_inventory)
    previous.check_fits_base()
    return previous


def adapter_spec(adapter_dir: str | Path) -> LoraSpec:
    """The validated spec of an adapter folder that is no opened checkpoint (one a plan adds itself)."""
    adapter_dir = Path(adapter_dir)
    return spec_from_config(read_json(adapter_dir / ADAPTER_CONFIG), adapter_dir)


def _local_base(named: str | None, adapter_dir: Path) -> Path | None:
    """The local folder of the base an adapter's config names; None when it names none there."""
    if not named:
        return None
    try:
        return resolve_base(named, adapter_dir, explicit=False)
    except BadInput:
        return None


def find_adapter_dir(path: Path) -> Path:
    if not path.exists():
        raise BadInput(f"no such path: {path}")
    if path.is_file():
        if path.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            return find_adapter_dir(path.parent)
        raise BadInput(f"{path} is a file; pass the checkpoint folder that holds {ADAPTER_CONFIG}")
    if (path / ADAPTER_CONFIG).is_file():
        return path
    # Some trainers nest the adapter one level down (e.g. checkpoint-500/adapter/).
    nested = sorted(p.parent for p in path.glob(f"*/{ADAPTER_CONFIG}"))
    if len(nested) == 1:
        return nested[0]
    if len(nested) > 1:
        names = ", ".join(p.name for p in nested)
        raise BadInput(f"{path} holds several adapters ({names}); pass one of them")
    raise BadInput(f"{path} has no {ADAPTER_CONFIG}: pass a PEFT adapter folder or a trainer checkpoint that holds one")


def resolve_base(base_model: str, adapter_dir: Path, explicit: bool) -> Path:
    if not base_model:
        raise BadInput(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass --base PATH")
    candidates = [Path(base_model)] if explicit or Path(base_model).is_absolute() else [
        Path(base_model),
        adapter_dir / base_model,
    ]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if explicit:
        raise BadInput(f"base model {base_model} is not a local model folder (no config.json)")
    raise BadInput(
        f"base model {base_model!r} (from {ADAPTER_CONFIG}) is not a local model folder; pass --base PATH"
    )


def check_fits_base(adapter: AdapterInventory, base: BaseInventory) -> None:
    """Every linear adapter module has a base weight of its shape. Names are matched the way vLLM matches
    them (names.py); a module under a prefix the engine does not map is matched by its path inside its
    block here and left to the pre-flight's `engine_name_mismatch` finding, which names all three names."""
    for module, factors in sorted(adapter.linear.items()):
        resolved = base.names.resolve(module)
        weight = base.module_weight(module, resolved)
        if weight is None:
            raise BadInput(
                f"adapter module {module} has no weight in base {base.folder} ({resolved.side_by_side()}): "
                "wrong base model? (pass --base)"
            )
        key, (out_features, in_features) = weight.name, (weight.shape[0], weight.shape[-1])
        if factors["A"].shape[-1] != in_features or factors["B"].shape[0] != out_features:
            raise BadInput(
                f"adapter does not fit base {base.folder}: {module} is {out_features}x{in_features} in the base ({key}) "
                f"but the adapter's B·A is {factors['B'].shape[0]}x{factors['A'].shape[-1]}; pass the base it was trained on (--base)"
            )
