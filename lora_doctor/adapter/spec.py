"""The LoRA an adapter_config.json describes, validated field by field as PEFT's `LoraConfig` and vLLM's
`PEFTHelper` read it: one `LoraSpec`, or one `BadInput` line naming the file, the field and what is wrong.

Only what changes ΔW or the adapter's meaning is checked; fields PEFT reads and lora-doctor does not use
are left to PEFT. No vLLM import.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput

ADAPTER_CONFIG = "adapter_config.json"
# PEFT's LoraConfig default when a config leaves lora_alpha out.
PEFT_DEFAULT_ALPHA = 8
# PEFT's `target_modules` shorthand for every linear layer but the output head (tuners_utils.py).
ALL_LINEAR = "all-linear"
# PEFT's `bias` choices (LoraConfig): which biases the adapter trains.
BIAS_CHOICES = ("none", "all", "lora_only")


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
    bias: str = "none"
    trainable_token_indices: list | dict | None = None
    layers_to_transform: list[int] | None = None
    base_model_name_or_path: str | None = None

    @property
    def max_rank(self) -> int:
        """The largest rank of any module (r, or a `rank_pattern` override)."""
        return max([self.r, *self.rank_pattern.values()])

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


def spec_from_config(config: dict, adapter_dir: Path) -> LoraSpec:
    """The validated spec of one adapter config; `BadInput` naming the first bad field."""
    fields = _Fields(config, Path(adapter_dir) / ADAPTER_CONFIG)
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise fields.bad("peft_type", f"is {_json(peft_type)}: a LoRA adapter's config says \"LORA\"")
    if peft_type.upper() != "LORA":
        raise BadInput(f"{adapter_dir}: peft_type is {peft_type!r}; only LoRA adapters are supported")
    if "r" not in config:
        raise fields.bad("r", "is missing: the LoRA rank is needed to scale ΔW")
    r = fields.rank("r", config["r"])
    alpha = fields.number("lora_alpha", config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    if alpha == 0:
        raise fields.bad("lora_alpha", "is 0: the LoRA can change nothing (ΔW = lora_alpha/r·B·A = 0 whatever B and A hold), so there is nothing to measure")
    rank_pattern = fields.patterns("rank_pattern", lambda key, value: fields.rank(f"rank_pattern[{_json(key)}]", value))
    alpha_pattern = fields.patterns("alpha_pattern", lambda key, value: fields.alpha(f"alpha_pattern[{_json(key)}]", value))
    return LoraSpec(
        r=r,
        lora_alpha=alpha,
        use_rslora=fields.flag("use_rslora"),
        target_modules=fields.targets(),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=fields.names("modules_to_save"),
        use_dora=fields.flag("use_dora"),
        fan_in_fan_out=fields.flag("fan_in_fan_out"),
        bias=fields.bias(),
        trainable_token_indices=fields.token_indices(),
        layers_to_transform=fields.layers(),
        base_model_name_or_path=fields.base_model(),
    )


def _json(value) -> str:
    """A value as the config file writes it (null, true, "q_proj")."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


class _Fields:
    """Readers of one config's fields, each raising `BadInput` that names the file and the field."""

    def __init__(self, config: dict, where: Path):
        self.config, self.where = config, where

    def bad(self, name: str, what: str) -> BadInput:
        return BadInput(f"{self.where}: {name} {what}")

    def rank(self, name: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.bad(name, f"is {_json(value)}: a LoRA rank is a whole number of at least 1")
        return value

    def number(self, name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.bad(name, f"is {_json(value)}: expected a finite number")
        return float(value)

    def alpha(self, name: str, value) -> float:
        alpha = self.number(name, value)
        if alpha == 0:
            raise self.bad(name, "is 0: the LoRA of the modules it matches can change nothing (ΔW = 0 whatever B and A hold)")
        return alpha

    def flag(self, name: str) -> bool:
        value = self.config.get(name)
        if value is not None and not isinstance(value, bool):
            raise self.bad(name, f"is {_json(value)}: expected true or false")
        return bool(value)

    def regex(self, name: str, pattern: str) -> None:
        try:
            re.compile(pattern)
        except re.error as error:
            raise self.bad(name, f"{_json(pattern)} is not a regular expression ({error})") from None

    def patterns(self, name: str, check) -> dict:
        value = self.config.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad(name, f"is {_json(value)}: expected an object of module pattern → value")
        for key, item in value.items():
            self.regex(name, key)
            check(key, item)
        return {key: (float(item) if name == "alpha_pattern" else item) for key, item in value.items()}

    def targets(self) -> list[str]:
        """`target_modules` in each form PEFT takes: null, "all-linear", a regex on full module names, or
        a list of names (a name matches a module it ends with)."""
        value = self.config.get("target_modules")
        if value is None:
            return []
        if isinstance(value, str):
            if value != ALL_LINEAR:
                self.regex("target_modules", value)
            return [value]
        if isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value):
            return sorted(value)
        raise self.bad("target_modules", f"is {_json(value)}: expected a list of module names, a regular expression or \"{ALL_LINEAR}\"")

    def names(self, name: str) -> list[str]:
        value = self.config.get(name)
        if value is None:
            return []
        if not isinstance(value, (list, tuple, set)) or not all(isinstance(item, str) for item in value):
            raise self.bad(name, f"is {_json(value)}: expected null or a list of module names")
        return list(value)

    def bias(self) -> str:
        value = self.config.get("bias")
        if value is None:
            return "none"
        if value not in BIAS_CHOICES:
            raise self.bad("bias", f"is {_json(value)}: PEFT takes {', '.join(map(_json, BIAS_CHOICES))}")
        return value

    def indices(self, name: str, value) -> list[int]:
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise self.bad(name, f"is {_json(value)}: expected a list of token ids (whole numbers ≥ 0)")
        return value

    def token_indices(self) -> list | dict | None:
        """PEFT's `trainable_token_indices`: a list of token ids (on the input embedding), or
        {module name: list of token ids}."""
        value = self.config.get("trainable_token_indices")
        if value is None:
            return None
        if isinstance(value, dict):
            for key, item in value.items():
                self.indices(f"trainable_token_indices[{_json(key)}]", item)
            return value
        return self.indices("trainable_token_indices", value)

    def layers(self) -> list[int] | None:
        value = self.config.get("layers_to_transform")
        if value is None:
            return None
        listed = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(listed, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed):
            raise self.bad("layers_to_transform", f"is {_json(value)}: expected null, a layer index or a list of layer indices")
        return listed

    def base_model(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        if value is not None and not isinstance(value, str):
            raise self.bad("base_model_name_or_path", f"is {_json(value)}: expected a model folder or hub name, or null")
        return value
