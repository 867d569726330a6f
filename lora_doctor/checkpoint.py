"""Resolve and validate a LoRA checkpoint and its base model; read its LoRA spec."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, unreadable_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


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

    @property
    def max_rank(self) -> int:
        """The largest rank of any module (r, or a `rank_pattern` override)."""
        return max([self.r, *map(int, self.rank_pattern.values())])

    @property
    def scaling(self) -> float:
        """PEFT's `s`: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class Checkpoint:
    """A PEFT adapter folder and the local base model it applies to."""

    adapter_dir: Path
    base_dir: Path
    base_model: str
    spec: LoraSpec
    module_names: list[str]

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
    shapes = adapter_shapes(adapter_dir)
    check_fits_base(shapes, base_dir)
    return Checkpoint(
        adapter_dir=adapter_dir.resolve(),
        base_dir=base_dir.resolve(),
        base_model=base_model,
        spec=spec,
        module_names=sorted(shapes),
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


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} does not hold a JSON object")
    return data


def spec_from_config(config: dict, adapter_dir: Path) -> LoraSpec:
    try:
        r = int(config["r"])
        alpha = float(config.get("lora_alpha", r))
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


def adapter_shapes(adapter_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module name → {"A": shape, "B": shape}, read from the safetensors header only."""
    from safetensors import safe_open

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise BadInput(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                for kind in ("A", "B"):
                    suffix = f".lora_{kind}.weight"
                    if key.endswith(suffix):
                        module = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
                        shapes.setdefault(module, {})[kind] = tuple(handle.get_slice(key).get_shape())
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise unreadable_safetensors(weights, error) from None
    if not shapes:
        raise BadInput(f"{weights} holds no LoRA weights (no '*.lora_A.weight' tensors)")
    incomplete = sorted(m for m, s in shapes.items() if set(s) != {"A", "B"})
    if incomplete:
        raise BadInput(f"{weights}: {incomplete[0]} has lora_A or lora_B but not both")
    return shapes


def base_weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape for every safetensors file of a base model (headers only)."""
    from safetensors import safe_open

    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise BadInput(f"base model {base_dir} has no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as error:
            raise unreadable_safetensors(file, error) from None
    return shapes


def check_fits_base(adapter: dict[str, dict[str, tuple[int, ...]]], base_dir: Path) -> None:
    """Every adapter module has a base weight of its shape. Names are matched the way vLLM matches them
    (names.py); a module under a prefix the engine does not map is matched by its path inside its block
    here and left to the pre-flight's `engine_name_mismatch` finding, which names all three names."""
    from .names import NameMap, engine_naming

    base = base_weight_shapes(base_dir)
    architectures = read_json(base_dir / "config.json").get("architectures") or [""]
    names = NameMap(base, engine_naming(str(architectures[0])))
    for module, factor in sorted(adapter.items()):
        resolved = names.resolve(module)
        key = resolved.base or resolved.nearest_base
        if key is None:
            raise BadInput(
                f"adapter module {module} has no weight in base {base_dir} ({resolved.side_by_side()}): "
                "wrong base model? (pass --base)"
            )
        weight = base[key]
        out_features, in_features = weight[0], weight[-1]
        if factor["A"][-1] != in_features or factor["B"][0] != out_features:
            raise BadInput(
                f"adapter does not fit base {base_dir}: {module} is {out_features}x{in_features} in the base ({key}) "
                f"but the adapter's B·A is {factor['B'][0]}x{factor['A'][-1]}; pass the base it was trained on (--base)"
            )
