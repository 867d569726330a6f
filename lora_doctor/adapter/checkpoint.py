"""Resolve and validate a LoRA checkpoint and its base model; read its LoRA spec."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from .inventory import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterInventory, BaseInventory, read_adapter, read_base, read_json

# PEFT's LoraConfig default when a config leaves lora_alpha out.
PEFT_DEFAULT_ALPHA = 8


@dataclass(frozen=True)
class LoraSpec:
    """What the adapter config says about the LoRA (PEFT semantics)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    use_dora: bool = False
    fan_in_fan_out: bool = False

    @property
    def max_rank(self) -> int:
        """The largest rank of any module (r, or a numeric `rank_pattern` override)."""
        pattern = [int(v) for v in self.rank_pattern.values() if isinstance(v, (int, float))]
        return max([self.r, *pattern])

    @property
    def scaling(self) -> float:
        """PEFT's `s`: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def scaling_for(self, module: str) -> float:
        """The scaling PEFT gives `module`, with rank_pattern / alpha_pattern overrides."""
        rank = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's `get_pattern_key` (the same rule as vLLM's PEFTHelper._match_pattern): the first key that
    matches a dotted suffix of the name; None when none does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A PEFT adapter folder and the local base model it applies to."""

    adapter_dir: Path
    base_dir: Path
    base_model: str
    spec: LoraSpec
    module_names: list[str]

    def adapter(self) -> AdapterInventory:
        return read_adapter(self.adapter_dir)

    def base(self) -> BaseInventory:
        return read_base(self.base_dir)

    def summary(self) -> dict:
        """The checkpoint as the JSON report records it."""
        spec = self.spec
        return {
            "path": str(self.adapter_dir),
            "base_model": self.base_model,
            "base_path": str(self.base_dir),
            "r": spec.r,
            "lora_alpha": spec.lora_alpha,
            "use_rslora": spec.use_rslora,
            "scaling": spec.scaling,
            "target_modules": spec.target_modules,
        }

    @property
    def tokenizer_dir(self) -> Path:
        """Trainers save the tokenizer beside the adapter; fall back to the base's."""
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (self.adapter_dir / name).is_file():
                return self.adapter_dir
        return self.base_dir


def load_checkpoint(path: str | Path, base: str | Path | None = None) -> Checkpoint:
    """Find the adapter in `path`, resolve the base, and check that they fit together."""
    adapter_dir = find_adapter_dir(Path(path))
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise BadInput(f"{adapter_dir}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    spec = spec_from_config(config, adapter_dir)
    base_model = str(base) if base is not None else config.get("base_model_name_or_path") or ""
    base_dir = resolve_base(base_model, adapter_dir, explicit=base is not None)
    adapter = read_adapter(adapter_dir)
    incomplete = sorted(m for m, factors in adapter.lora_modules.items() if set(factors) != {"A", "B"})
    if incomplete:
        raise BadInput(f"{adapter.file}: {incomplete[0]} has lora_A or lora_B but not both")
    check_fits_base(adapter, read_base(base_dir))
    return Checkpoint(
        adapter_dir=adapter_dir.resolve(),
        base_dir=base_dir.resolve(),
        base_model=base_model,
        spec=spec,
        module_names=sorted(adapter.linear),
    )


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


def spec_from_config(config: dict, adapter_dir: Path) -> LoraSpec:
    try:
        r = int(config["r"])
        alpha = float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{adapter_dir / ADAPTER_CONFIG}: missing or invalid 'r' / 'lora_alpha'") from None
    if r <= 0:
        raise BadInput(f"{adapter_dir / ADAPTER_CONFIG}: r must be positive, got {r}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return LoraSpec(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=sorted(targets),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        modules_to_save=list(config.get("modules_to_save") or []),
        use_dora=bool(config.get("use_dora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
    )


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
    from .names import NameMap, engine_naming

    names = NameMap(base.tensors, engine_naming(base.architecture))
    for module, factors in sorted(adapter.linear.items()):
        resolved = names.resolve(module)
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
