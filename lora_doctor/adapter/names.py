"""One map between the three names of a LoRA-targeted module.

- the adapter's: PEFT's module path in the trainer's model, `base_model.model.` removed
  (`model.language_model.layers.0.self_attn.q_proj` for a transformers >= 4.52 Qwen2.5-VL);
- the base checkpoint's weight key, as the transformers version that saved it wrote it
  (`model.layers.0.self_attn.q_proj.weight` — transformers 5 saves Qwen2.5-VL in the original layout —
  or `model.language_model.layers.0.self_attn.q_proj.weight`);
- the engine's module name (`language_model.model.layers.0.self_attn.q_proj`, inside vLLM's packed
  `qkv_proj`).

vLLM renames both the base weights and the adapter's module names with the architecture's
`hf_to_vllm_mapper` (model_executor/models/utils.py `WeightsMapper`, applied to LoRA names by
lora/worker_manager.py:129-135 → lora/utils.py `parse_fine_tuned_lora_name`), then activates a LoRA on
an engine module only when the renamed adapter name equals that module's name (lora/model_manager.py);
an adapter module whose renamed name matches nothing loads without error and is never applied. So the
engine name is the join key: an adapter module and a base weight are the same module when the mapper
sends them to the same engine name. The mapper, the multimodal part prefixes (`get_mm_mapping`) and
`supports_tower_connector_lora` are read from the installed vLLM's source with `ast` (no vLLM import,
no engine); a mapper that is not a literal there is read by importing its model class.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .inventory import PEFT_PREFIX, read_base

WEIGHT = ".weight"

# Roles of an engine module (lora/model_manager.py `_get_punica_wrapper`): LoRA is served on the
# language model; on a multimodal model's tower and connector only with enable_tower_connector_lora.
LANGUAGE_MODEL, TOWER, CONNECTOR, OTHER = "language_model", "tower", "connector", "other"


@dataclass(frozen=True)
class Renamer:
    """The renaming part of vLLM's `WeightsMapper` (its `get_rename_mapper()`: stacking and drops left out)."""

    regex: tuple[tuple[str, str], ...] = ()
    substr: tuple[tuple[str, str], ...] = ()
    prefix: tuple[tuple[str, str], ...] = ()
    suffix: tuple[tuple[str, str], ...] = ()

    def __call__(self, name: str) -> str:
        # Same order and semantics as WeightsMapper._map_name_with_shard: every matching rule applies,
        # each rewriting its first occurrence.
        for pattern, new in self.regex:
            if re.search(pattern, name):
                name = re.sub(pattern, new, name)
        for old, new in self.substr:
            if old in name:
                name = name.replace(old, new, 1)
        for old, new in self.prefix:
            if name.startswith(old):
                name = name.replace(old, new, 1)
        for old, new in self.suffix:
            if name.endswith(old):
                name = new.join(name.rsplit(old, 1))
        return name

    @property
    def rules(self) -> list[str]:
        """The rules as text, for messages: `'model.' → 'language_model.model.'`."""
        return [f"{old!r} → {new!r}" for group in (self.regex, self.substr, self.prefix, self.suffix) for old, new in group]


@dataclass(frozen=True)
class EngineNaming:
    """How vLLM names an architecture's modules, read from its model class."""

    architecture: str
    renamer: Renamer = field(default_factory=Renamer)
    language_model: tuple[str, ...] = ()  # module prefixes; empty: the whole model is the language model
    tower: tuple[str, ...] = ()
    connector: tuple[str, ...] = ()
    tower_lora: bool = False  # the class declares supports_tower_connector_lora
    source: str = ""  # "vllm/model_executor/models/qwen2_5_vl.py:Qwen2_5_VLForConditionalGeneration", or why none

    def role(self, engine_name: str) -> str:
        """LANGUAGE_MODEL, TOWER or CONNECTOR: the longest matching prefix wins, as in vLLM; OTHER (never
        LoRA-wrapped) outside all of a multimodal model's parts."""
        prefixes = [(p, LANGUAGE_MODEL) for p in self.language_model]
        prefixes += [(p, TOWER) for p in self.tower] + [(p, CONNECTOR) for p in self.connector]
        for prefix, role in sorted(prefixes, key=lambda item: len(item[0]), reverse=True):
            if engine_name.startswith(prefix):
                return role
        return LANGUAGE_MODEL if not self.language_model else OTHER


@dataclass(frozen=True)
class ModuleNames:
    """One adapter module in the three vocabularies."""

    adapter: str  # PEFT's module path, `base_model.model.` removed
    engine: str  # what vLLM renames it to, and looks for among its modules
    base: str | None  # the base weight key that renames to the same engine name; None: no such weight
    role: str  # LANGUAGE_MODEL / TOWER / CONNECTOR / OTHER
    # For an adapter module that matches nothing: the base weight it most likely meant (same
    # layer-relative path) and that weight's engine name.
    nearest_base: str | None = None
    nearest_engine: str | None = None

    @property
    def matched(self) -> bool:
        return self.base is not None

    @property
    def prefix_mismatch(self) -> bool:
        """The base has this module under another name that the engine does not map to the adapter's."""
        return self.base is None and self.nearest_base is not None

    def side_by_side(self) -> str:
        """The three names, for messages."""
        if self.base is not None:
            return f"adapter {self.adapter} → engine {self.engine} ← base {self.base}"
        if self.nearest_base is not None:
            return (
                f"adapter {self.adapter} → engine {self.engine} (no such module); "
                f"base {self.nearest_base} → engine {self.nearest_engine}"
            )
        return f"adapter {self.adapter} → engine {self.engine}; the base has no such weight"


class NameMap:
    """Adapter module ↔ base weight key ↔ engine module name, for one base model."""

    def __init__(self, base_keys, naming: EngineNaming):
        self.naming = naming
        # engine module name → base weight key, for every 2-D+ weight the engine loads.
        self._base_by_engine: dict[str, str] = {}
        self._base_by_tail: dict[str, list[str]] = {}
        for key in sorted(base_keys):
            if key.endswith(WEIGHT):
                module = key[: -len(WEIGHT)]
                self._base_by_engine.setdefault(naming.renamer(module), key)
                self._base_by_tail.setdefault(_tail(module), []).append(key)

    def engine_name(self, module: str) -> str:
        """vLLM's name for a module given in the adapter's or the base's vocabulary (no `.weight`)."""
        return self.naming.renamer(module.removeprefix(PEFT_PREFIX))

    def base_key(self, module: str) -> str | None:
        """The base checkpoint's weight key for an adapter module (or a ΔW name ending in `.weight`)."""
        module = module.removeprefix(PEFT_PREFIX)
        return self._base_by_engine.get(self.engine_name(module.removesuffix(WEIGHT)))

    def base_key_for_engine(self, engine_module: str) -> str | None:
        """The base checkpoint's weight key for one of vLLM's (unpacked) module names."""
        return self._base_by_engine.get(engine_module)

    def by_engine_name(self, adapter_modules) -> dict[str, str]:
        """Engine module name → adapter module name, for joining what the engine holds per module
        (named by vLLM) with the adapter's factors and the reference's ΔW (named by the adapter)."""
        return {self.engine_name(module): module.removeprefix(PEFT_PREFIX) for module in adapter_modules}

    def resolve(self, module: str) -> ModuleNames:
        module = module.removeprefix(PEFT_PREFIX)
        engine = self.engine_name(module)
        base = self._base_by_engine.get(engine)
        role = self.naming.role(engine)
        if base is not None:
            return ModuleNames(module, engine, base, role)
        nearest = self._nearest(module)
        nearest_engine = self.engine_name(nearest[: -len(WEIGHT)]) if nearest else None
        if nearest_engine is not None:
            role = self.naming.role(nearest_engine)
        return ModuleNames(module, engine, None, role, nearest, nearest_engine)

    def _nearest(self, module: str) -> str | None:
        """The base weight with the same path inside its block (`layers.0.self_attn.q_proj`), the
        shortest name first; None when the base has no such weight at all (a wrong base)."""
        candidates = self._base_by_tail.get(_tail(module), [])
        return min(candidates, key=lambda k: (len(k), k)) if candidates else None


def _tail(module: str) -> str:
    """The part of a module path from its block list on: `x.y.layers.0.self_attn.q_proj` →
    `layers.0.self_attn.q_proj`; a path without a numbered block keeps its last two parts."""
    parts = module.split(".")
    for i in range(len(parts) - 1):
        if parts[i + 1].isdigit():
            return ".".join(parts[i:])
    return ".".join(parts[-2:])


# --------------------------------------------------------------------------- reading vLLM


@lru_cache(maxsize=None)
def engine_naming(architecture: str) -> EngineNaming:
    """vLLM's naming for an HF architecture (config.json `architectures[0]`), from the installed vLLM."""
    root = _vllm_root()
    if root is None:
        return EngineNaming(architecture, source="vLLM is not installed: names are compared as they are")
    target = _registry(root).get(architecture)
    if target is None:
        return EngineNaming(architecture, source=f"{architecture} is not in vLLM's model registry: names are compared as they are")
    module_name, class_name = target
    reader = _ClassReader(root / "model_executor" / "models")
    found = reader.find(module_name, class_name)
    mapper = reader.attribute(found, "hf_to_vllm_mapper") if found else None
    renamer = _renamer(mapper, reader, found[0]) if mapper is not None else Renamer()
    source = f"vllm/model_executor/models/{module_name}.py:{class_name}"
    if renamer is None:
        try:
            renamer = _imported_renamer(module_name, class_name)
        except Exception as error:  # a model file that does not import here: compare names as they are
            renamer, source = Renamer(), f"{source} (its hf_to_vllm_mapper did not load: {type(error).__name__})"
    mm = reader.mm_mapping(found) if found else {}
    tower_lora = reader.attribute(found, "supports_tower_connector_lora") if found else None
    return EngineNaming(
        architecture,
        renamer=renamer,
        language_model=mm.get("language_model", ()),
        tower=mm.get("tower_model", ()),
        connector=mm.get("connector", ()),
        tower_lora=isinstance(tower_lora, ast.Constant) and tower_lora.value is True,
        source=source,
    )


@lru_cache(maxsize=None)
def name_map(base_dir: str | Path) -> NameMap:
    """The name map of a local base model folder (config.json + safetensors headers)."""
    return read_base(Path(base_dir)).names


def _vllm_root() -> Path | None:
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parent if spec and spec.origin else None


@lru_cache(maxsize=None)
def _registry(root: Path) -> dict[str, tuple[str, str]]:
    """Architecture → (module, class) from model_executor/models/registry.py's literal tables."""
    tree = ast.parse((root / "model_executor" / "models" / "registry.py").read_text())
    table: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (
                    isinstance(key, ast.Constant)
                    and isinstance(value, ast.Tuple)
                    and len(value.elts) == 2
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts)
                ):
                    table.setdefault(key.value, (value.elts[0].value, value.elts[1].value))
    return table


class _ClassReader:
    """Finds a model class and the class attributes it defines or inherits, in vLLM's model sources."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self._trees: dict[str, ast.Module | None] = {}

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.models_dir / f"{module}.py"
            self._trees[module] = ast.parse(path.read_text()) if path.is_file() else None
        return self._trees[module]

    def find(self, module: str, class_name: str) -> tuple[str, ast.ClassDef] | None:
        tree = self.tree(module)
        if tree is None:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                return module, node
        for node in tree.body:  # imported from a sibling model file: `from .qwen2_vl import X`
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                if any((a.asname or a.name) == class_name for a in node.names):
                    original = next(a.name for a in node.names if (a.asname or a.name) == class_name)
                    return self.find(node.module.split(".")[0], original)
        return None

    def bases(self, found: tuple[str, ast.ClassDef]):
        module, node = found
        for base in node.bases:
            if isinstance(base, ast.Name):
                parent = self.find(module, base.id)
                if parent is not None:
                    yield parent

    def attribute(self, found: tuple[str, ast.ClassDef], name: str, depth: int = 0) -> ast.expr | None:
        """The expression assigned to a class attribute, here or in a base class (MRO order approximated)."""
        for node in found[1].body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
                return node.value
        if depth < 8:
            for parent in self.bases(found):
                value = self.attribute(parent, name, depth + 1)
                if value is not None:
                    return value
        return None

    def mm_mapping(self, found: tuple[str, ast.ClassDef], depth: int = 0) -> dict[str, tuple[str, ...]]:
        """The `MultiModelKeys.from_string_field(...)` fields of the class's `get_mm_mapping`."""
        for node in found[1].body:
            if isinstance(node, ast.FunctionDef) and node.name == "get_mm_mapping":
                for call in ast.walk(node):
                    if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "from_string_field":
                        fields = {}
                        for keyword in call.keywords:
                            value = _literal(keyword.value)
                            if isinstance(value, str):
                                fields[keyword.arg] = (value,)
                            elif isinstance(value, list):
                                fields[keyword.arg] = tuple(value)
                        return fields
        if depth < 8:
            for parent in self.bases(found):
                fields = self.mm_mapping(parent, depth + 1)
                if fields:
                    return fields
        return {}


_RENAME_FIELDS = {"orig_to_new_regex": "regex", "orig_to_new_substr": "substr", "orig_to_new_prefix": "prefix", "orig_to_new_suffix": "suffix"}


def _renamer(expr: ast.expr, reader: _ClassReader, module: str, depth: int = 0) -> Renamer | None:
    """A `WeightsMapper(...)` literal, another class's mapper (`Qwen2Model.hf_to_vllm_mapper`) or
    `A | B` of those, as a Renamer; None when it is none of these."""
    if depth > 8:
        return None
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
        left, right = _renamer(expr.left, reader, module, depth + 1), _renamer(expr.right, reader, module, depth + 1)
        if left is None or right is None:
            return None
        return Renamer(**{f: tuple({**dict(getattr(left, f)), **dict(getattr(right, f))}.items()) for f in _RENAME_FIELDS.values()})
    if isinstance(expr, ast.Attribute) and expr.attr == "hf_to_vllm_mapper" and isinstance(expr.value, ast.Name):
        owner = reader.find(module, expr.value.id)
        value = reader.attribute(owner, "hf_to_vllm_mapper") if owner else None
        return _renamer(value, reader, owner[0], depth + 1) if value is not None else None
    if not (isinstance(expr, ast.Call) and getattr(expr.func, "id", getattr(expr.func, "attr", "")) == "WeightsMapper"):
        return None
    rules: dict[str, tuple[tuple[str, str], ...]] = {}
    for keyword in expr.keywords:
        if keyword.arg == "orig_to_new_stacked":
            continue  # packing, not renaming: get_rename_mapper() drops it too
        if keyword.arg not in _RENAME_FIELDS or not isinstance(keyword.value, ast.Dict):
            return None
        pairs = []
        for key, value in zip(keyword.value.keys, keyword.value.values):
            old, new = _regex_literal(key) if keyword.arg == "orig_to_new_regex" else _literal(key), _literal(value)
            if not isinstance(old, str) or (new is not None and not isinstance(new, str)):
                return None
            if new is not None:  # a drop: get_rename_mapper() leaves it out
                pairs.append((old, new))
        rules[_RENAME_FIELDS[keyword.arg]] = tuple(pairs)
    return Renamer(**rules)


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return _NOT_LITERAL


def _regex_literal(node: ast.expr):
    """`re.compile("pattern")` → "pattern"."""
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "compile" and node.args:
        return _literal(node.args[0])
    return _NOT_LITERAL


_NOT_LITERAL = object()


def _imported_renamer(module_name: str, class_name: str) -> Renamer:
    """The class's mapper, imported (a computed mapper); importing a model file starts no engine."""
    import importlib

    cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)
    mapper = cls.hf_to_vllm_mapper.get_rename_mapper()
    return Renamer(
        regex=tuple((p.pattern, n) for p, n in mapper.orig_to_new_regex.items()),
        substr=tuple(mapper.orig_to_new_substr.items()),
        prefix=tuple(mapper.orig_to_new_prefix.items()),
        suffix=tuple(mapper.orig_to_new_suffix.items()),
    )
