"""Pre-flight inspection of a LoRA checkpoint, no engine needed.

Reads only the adapter folder (config + tensor headers, through the adapter inventory) and the base
model's config.json and safetensors headers (the base inventory), and lists what an inference engine
(vLLM in particular, see `engine.serving` for the facts read in its sources) refuses, drops or computes
differently from the trainer's PEFT model. No vLLM import, no printing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .adapter.checkpoint import Checkpoint, LoraSpec, open_checkpoint, pattern_key
from .adapter.dtypes import HALF_PRECISION
from .adapter.inventory import (
    ADAPTER_WEIGHTS,
    EMBEDDING_NAMES,
    OUTPUT_NAMES,
    PEFT_PREFIX,
    AdapterInventory,
    BaseInventory,
)
from .adapter.names import CONNECTOR, OTHER, TOWER, ModuleNames, NameMap
from .adapter.weight_files import TensorInfo
from .engine.serving import BASE_MODIFYING_INITS, EMBEDDING_LORA_ARCHITECTURES, UNSUPPORTED_FEATURES, vllm_lora_ranks
from .errors import BadInput

SCHEMA_VERSION = 1
SEVERITIES = ("problem", "warning", "info")
# Problems that make vLLM refuse to load the adapter (its own ValueError after the engine started):
# an adapter sync of it cannot run, a merged sync can.
ADAPTER_REFUSED = frozenset({
    "modules_to_save", "lora_on_lm_head", "lora_on_embed_tokens", "trainable_tokens", "dora", "lora_bias",
    "init_modifies_base", "unsupported_feature", "bias", "rank_above_max", "unrecognized_tensor",
})


@dataclass(frozen=True)
class Finding:
    """One thing an engine will refuse, drop or compute differently from the trainer."""

    code: str
    severity: str  # "problem" | "warning" | "info"
    message: str
    fix: str
    # The module / tensor / config names concerned (full list; the message may abbreviate).
    subjects: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "fix": self.fix,
            "subjects": list(self.subjects),
        }


@dataclass
class PreflightReport:
    checkpoint: dict
    findings: list[Finding] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "problem"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "kind": "preflight",
            "checkpoint": dict(self.checkpoint),
            "findings": [f.to_dict() for f in self.findings],
            "exit_code": self.exit_code,
        }


def inspect_checkpoint(
    path: str | Path | Checkpoint, base: str | Path | None = None, max_lora_rank: int | None = None
) -> PreflightReport:
    """Inspect a PEFT LoRA checkpoint (a folder, or a `Checkpoint` already opened) against its base model
    without starting an engine.

    Raises `BadInput` for what cannot be inspected at all (missing path, no adapter_config.json, a bad
    field in it, unreadable safetensors, base not found); everything else becomes a `Finding`."""
    if max_lora_rank is not None and max_lora_rank <= 0:
        raise BadInput(f"--max-lora-rank must be a positive integer, got {max_lora_rank}")
    checkpoint = open_checkpoint(path, base)
    spec, config, adapter_dir, base_dir, base_model = checkpoint.spec, checkpoint.config, checkpoint.adapter_dir, checkpoint.base_dir, checkpoint.base_model
    base_inventory = checkpoint.base()
    adapter = checkpoint.adapter()

    ctx = _Context(spec, config, adapter, base_inventory, max_lora_rank, checkpoint.names)
    findings: list[Finding] = []
    for check in (
        _check_modules_to_save,
        _check_embedding_loras,
        _check_dora,
        _check_unsupported_features,
        _check_bias,
        _check_patterns,
        _check_rank,
        _check_fit,
        _check_engine_names,
        _check_unrecognized,
        _check_trainable_tokens,
        _check_nan_inf,
        _check_untrained,
        _check_dtype,
        _check_rslora,
        _check_fan_in_fan_out,
    ):
        findings.extend(check(ctx))
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))

    adapter_dtypes = sorted({t.dtype_name for factors in adapter.lora_modules.values() for t in factors.values()})
    summary = {
        "path": str(adapter_dir),
        "base_path": str(base_dir),
        "base_model": base_model,
        "architectures": list(ctx.architectures),
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "use_rslora": spec.use_rslora,
        "scaling": spec.scaling,
        "target_modules": spec.target_modules,
        "max_rank": spec.max_rank,
        "lora_modules": len(adapter.lora_modules),
        "adapter_dtype": adapter_dtypes[0] if len(adapter_dtypes) == 1 else adapter_dtypes,
        "base_dtype": base_inventory.dtype,
        "max_lora_rank": max_lora_rank,
    }
    return PreflightReport(checkpoint=summary, findings=findings)


@dataclass
class _Context:
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
    def module_names(self) -> dict[str, ModuleNames]:
        """Every adapter module in the three vocabularies (adapter, base, engine)."""
        return {module: self.names.resolve(module) for module in self.adapter.lora_modules}

    def base_weight(self, module: str) -> TensorInfo | None:
        return self.base.module_weight(module, self.module_names.get(module) or self.names.resolve(module))


# --------------------------------------------------------------------------- checks


def _check_modules_to_save(ctx: _Context) -> list[Finding]:
    listed = list(ctx.config.get("modules_to_save") or [])
    stored = ctx.adapter.full_modules
    if not listed and not stored:
        return []
    names = sorted(set(listed) | {m.rsplit(".", 1)[-1] for m in stored})
    tensors = [t.name for group in stored.values() for t in group]
    copies = [f"{t.name.removeprefix(PEFT_PREFIX)} {list(t.shape)}" for group in stored.values() for t in group]
    held = f"; the file holds the trained full copies {_abbreviate(copies, 3)}" if copies else ""
    if set(names) <= {"classifier", "score"}:
        return [
            Finding(
                "modules_to_save",
                "warning",
                f"modules_to_save {names}{held}. vLLM 0.32 loads a full 'classifier'/'score' copy only for "
                "cross-encoder pooling models (lora/model_manager.py:136, 1273); a generative model refuses the adapter",
                "serve it as a classification model, or train without modules_to_save",
                tuple(names + tensors),
            )
        ]
    tied = " (untied from the base's tied embed_tokens)" if ctx.base.ties_embeddings and "lm_head" in names else ""
    return [
        Finding(
            "modules_to_save",
            "problem",
            f"modules_to_save {names}{held}{tied}. vLLM 0.32 refuses the adapter (only None or "
            "['classifier', 'score'] are allowed, lora/peft_helper.py:56-65); engines that skip the check "
            "serve the base's frozen copy, not the trained one",
            "train without modules_to_save (or as LoRA targets vLLM serves), or merge the adapter and sync full weights",
            tuple(names + tensors),
        )
    ]


def _check_embedding_loras(ctx: _Context) -> list[Finding]:
    findings = []
    archs = ctx.architectures
    served = set().union(*(EMBEDDING_LORA_ARCHITECTURES.get(a, frozenset()) for a in archs)) if archs else set()
    arch = "/".join(archs) or "this architecture"
    for role, names, code in (("the LM head", OUTPUT_NAMES, "lora_on_lm_head"), ("the input embedding", EMBEDDING_NAMES, "lora_on_embed_tokens")):
        modules = sorted(m for m in ctx.adapter.lora_modules if m.rsplit(".", 1)[-1] in names)
        if not modules:
            continue
        tensors = tuple(t.name for m in modules for t in ctx.adapter.lora_modules[m].values())
        short = sorted({m.rsplit(".", 1)[-1] for m in modules})
        if ctx.base.ties_embeddings:
            findings.append(_tied_merge(role, modules))
        if any(s in served for s in short):
            findings.append(
                Finding(
                    code,
                    "info",
                    f"LoRA on {role} ({', '.join(modules)}): vLLM 0.32 serves it for {arch}, which declares "
                    "embedding_modules (lora/utils.py:232-245), through "
                    + ("LogitsProcessorWithLoRA (lora/model_manager.py:567)" if code == "lora_on_lm_head" else "VocabParallelEmbeddingWithLoRA (lora/layers/vocab_parallel_embedding.py:111)"),
                    "no action for vLLM; other engines may not serve LoRA on embeddings",
                    tuple(modules) + tensors,
                )
            )
            continue
        tied = ", tied to embed_tokens in the base" if code == "lora_on_lm_head" and ctx.base.ties_embeddings else ""
        findings.append(
            Finding(
                code,
                "problem",
                f"LoRA on {role} ({', '.join(modules)}{tied}): vLLM 0.32 refuses the adapter for {arch} "
                "('expected target modules in ... but received', lora/lora_model.py:268-279): LoRA on embeddings "
                "is served only for architectures that declare embedding_modules (lora/utils.py:232-245)",
                f"train without {'/'.join(short)} in target_modules, or merge that part into the base weights",
                tuple(modules) + tensors,
            )
        )
    return findings


def _tied_merge(role: str, modules: list[str]) -> Finding:
    other = "the input embedding" if role == "the LM head" else "the output head"
    return Finding(
        "tied_weight_merge",
        "warning",
        f"LoRA on {role} ({', '.join(modules)}) of a base that ties its output head to its input embedding: "
        f"PEFT's forward applies it to {role} only, but a merge (merge_and_unload, the merged syncs of TRL and "
        f"ms-swift) writes its ΔW into the one shared weight, so {other} moves too. Merged syncs then serve "
        "another policy than the one trained (lora-doctor's merged plans replay that merge and measure the gap)",
        "untie the head before training (tie_word_embeddings=False with its own copy), or train without "
        "LoRA on embed_tokens / lm_head",
        tuple(modules),
    )


def _check_trainable_tokens(ctx: _Context) -> list[Finding]:
    tokens = ctx.adapter.trainable_tokens
    if not tokens:
        return []
    setting = ctx.config.get("trainable_token_indices")
    count = sum(t.shape[0] for t in tokens.values())
    return [
        Finding(
            "trainable_tokens",
            "problem",
            f"trainable tokens (trainable_token_indices={setting!r}: {count} trained rows of "
            f"{', '.join(sorted(tokens))}): vLLM 0.32 refuses the adapter ('... is unsupported LoRA weight', "
            "lora/utils.py:220); an adapter sync fails, a merged sync must write the trained rows into the embedding"
            + (" (and the output head tied to it)" if ctx.base.ties_embeddings else ""),
            "sync merged weights (the rows written into the embedding), or train without trainable_token_indices",
            tuple(sorted(tokens)) + tuple(t.name for t in tokens.values()),
        )
    ]


def _check_untrained(ctx: _Context) -> list[Finding]:
    if not ctx.adapter.untrained():
        return []
    return [
        Finding(
            "untrained_adapter",
            "info",
            f"every lora_B of the adapter's {len(ctx.adapter.lora_modules)} modules is zero (PEFT's initialization: "
            "step 0, or a run that never trained): ΔW = 0, so the policy is the base model and every sync path "
            "serves it alike; there is nothing to measure",
            "check a checkpoint saved after at least one optimizer step",
            tuple(sorted(ctx.adapter.lora_modules)),
        )
    ]


def _check_dora(ctx: _Context) -> list[Finding]:
    if not ctx.config.get("use_dora") and not ctx.adapter.magnitude:
        return []
    count = len(ctx.adapter.magnitude)
    return [
        Finding(
            "dora",
            "problem",
            f"DoRA adapter (use_dora, {count} lora_magnitude_vector tensors): vLLM 0.32 refuses it "
            "('vLLM does not yet support DoRA', lora/peft_helper.py:66-67); W0 + s·B·A is not the trained policy",
            "train plain LoRA (use_dora=False), or merge the DoRA adapter into the base and sync full weights",
            tuple(t.name for t in ctx.adapter.magnitude),
        )
    ]


def _check_unsupported_features(ctx: _Context) -> list[Finding]:
    findings = []
    if ctx.config.get("lora_bias"):
        findings.append(
            Finding(
                "lora_bias",
                "problem",
                "lora_bias=True (a trained bias on lora_B): vLLM 0.32 refuses the adapter (lora/peft_helper.py:68-69)",
                "train with lora_bias=False",
                ("lora_bias",),
            )
        )
    init = ctx.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        findings.append(
            Finding(
                "init_modifies_base",
                "problem",
                f"init_lora_weights={init!r} rewrites the base weights when PEFT loads the adapter: "
                "vLLM 0.32 refuses it (lora/peft_helper.py:70-78)",
                "convert to plain LoRA with PEFT's path_initial_model_for_weight_conversion",
                ("init_lora_weights",),
            )
        )
    for key, label in UNSUPPORTED_FEATURES:
        if ctx.config.get(key):
            findings.append(
                Finding(
                    "unsupported_feature",
                    "problem",
                    f"{key} is set ({label}): vLLM 0.32 refuses the adapter (lora/peft_helper.py:79-86)",
                    f"train without {key}",
                    (key,),
                )
            )
    return findings


def _check_bias(ctx: _Context) -> list[Finding]:
    bias = ctx.config.get("bias") or "none"
    if bias == "none" and not ctx.adapter.base_layer_bias:
        return []
    tensors = [t.name for t in ctx.adapter.base_layer_bias]
    held = f", {len(tensors)} trained bias tensors in the file" if tensors else ""
    return [
        Finding(
            "bias",
            "problem",
            f"bias={bias!r}{held}: vLLM 0.32 refuses the adapter ('Adapter bias is not supported', "
            "lora/peft_helper.py:199-200); the trained biases are not servable as LoRA",
            'train with bias="none", or merge the adapter and sync full weights',
            tuple(["bias"] + tensors),
        )
    ]


def _check_patterns(ctx: _Context) -> list[Finding]:
    findings = []
    global_scaling = ctx.spec.scaling
    modules = sorted(ctx.adapter.lora_modules)
    for code, key, label in (("rank_pattern", "rank_pattern", "r"), ("alpha_pattern", "alpha_pattern", "alpha")):
        patterns = ctx.config.get(key) or {}
        if not patterns:
            continue
        parts, subjects = [], []
        for pattern, value in patterns.items():
            hits = [m for m in modules if pattern_key(patterns, m) == pattern]
            subjects.extend(hits)
            if not hits:
                parts.append(f"{pattern!r}→{label}={_num(value)} hits no module")
                continue
            scalings = sorted({ctx.spec.scaling_for(m) for m in hits})
            parts.append(
                f"{pattern!r}→{label}={_num(value)} on {_abbreviate(_compress(hits), 3)}: scaling "
                + "/".join(f"{s:g}" for s in scalings)
            )
        findings.append(
            Finding(
                code,
                "warning",
                f"{key}: {'; '.join(parts)} (global alpha/r scaling {global_scaling:g}); vLLM 0.32 applies it "
                "(lora/peft_helper.py:131-153) but trainers/engines that read only r and lora_alpha scale these modules wrong",
                f"check that both sides honour {key} (lora-doctor check measures the effective scale per module), "
                "or train with uniform r/lora_alpha",
                tuple(subjects),
            )
        )
    return findings


def _check_rank(ctx: _Context) -> list[Finding]:
    allowed, default = vllm_lora_ranks()
    rank = ctx.spec.max_rank
    fitting = [r for r in allowed if r >= rank]
    needed = f"--max-lora-rank {fitting[0]}" if fitting else None
    allowed_text = ", ".join(map(str, allowed))
    source = "max of r and rank_pattern" if ctx.config.get("rank_pattern") else "r"
    findings = []
    limit = ctx.max_lora_rank
    if limit is not None and limit not in allowed:
        findings.append(
            Finding(
                "max_lora_rank_invalid",
                "warning",
                f"max_lora_rank {limit} is not one vLLM 0.32 accepts ({allowed_text}; config/lora.py:26)",
                f"start vLLM with one of {allowed_text}",
                ("max_lora_rank",),
            )
        )
    if not fitting:
        findings.append(
            Finding(
                "rank_above_max",
                "problem",
                f"LoRA rank {rank} ({source}) is above every max_lora_rank vLLM 0.32 accepts ({allowed_text}); "
                "the adapter is refused (lora/peft_helper.py:193-198)",
                f"train with r <= {allowed[-1]}",
                ("r",),
            )
        )
    elif limit is not None and rank > limit:
        findings.append(
            Finding(
                "rank_above_max",
                "problem",
                f"LoRA rank {rank} ({source}) is above max_lora_rank {limit}: vLLM refuses the adapter "
                f"('LoRA rank {rank} is greater than max_lora_rank {limit}', lora/peft_helper.py:193-198); "
                f"allowed values: {allowed_text}",
                f"start vLLM with {needed}, or train with r <= {limit}",
                ("r",),
            )
        )
    elif limit is None and rank > default:
        findings.append(
            Finding(
                "rank_above_default_max",
                "info",
                f"LoRA rank {rank} ({source}) is above vLLM's default max_lora_rank {default} (config/lora.py:33); "
                f"allowed values: {allowed_text}",
                f"start vLLM with {needed} (or pass --max-lora-rank to check against your engine's setting)",
                ("r",),
            )
        )
    return findings


def _check_fit(ctx: _Context) -> list[Finding]:
    missing, mismatched, details = [], [], []
    fan_in_fan_out = bool(ctx.config.get("fan_in_fan_out"))
    for module, factors in sorted(ctx.adapter.lora_modules.items()):
        if set(factors) != {"A", "B"}:
            mismatched.append(module)
            details.append(f"{module} has only lora_{''.join(factors)}")
            continue
        weight = ctx.base_weight(module)
        if weight is None:
            missing.append(module)
            continue
        a, b = factors["A"].shape, factors["B"].shape
        if module in ctx.adapter.embedding:  # A: r × vocab, B: hidden × r, weight: vocab × hidden
            out_features, in_features = weight.shape[-1], weight.shape[0]
        elif fan_in_fan_out:  # Conv1D: weight is in × out
            out_features, in_features = weight.shape[-1], weight.shape[0]
        else:
            out_features, in_features = weight.shape[0], weight.shape[-1]
        rank_ok = len(a) == 2 and len(b) == 2 and a[0] == b[-1]
        if not rank_ok or a[-1] != in_features or b[0] != out_features:
            mismatched.append(module)
            details.append(
                f"{module}: base {list(weight.shape)}, adapter A {list(a)} B {list(b)}"
            )
    findings = []
    if missing:
        findings.append(
            Finding(
                "missing_target",
                "problem",
                f"{len(missing)} adapter modules have no weight in base {ctx.base_dir}: "
                f"{_abbreviate(_compress(missing), 4)}; an engine refuses or silently skips them",
                "pass the base the adapter was trained on (--base), or remove these modules from the adapter",
                tuple(missing),
            )
        )
    if mismatched:
        findings.append(
            Finding(
                "shape_mismatch",
                "problem",
                f"{len(mismatched)} adapter modules do not fit base {ctx.base_dir}: {_abbreviate(details, 2)}",
                "pass the base the adapter was trained on (--base); check hidden/intermediate sizes and vocab resizing",
                tuple(mismatched),
            )
        )
    return findings


def _check_engine_names(ctx: _Context) -> list[Finding]:
    """Adapter modules the engine would never apply: a name its mapper sends to no module (the
    prefix class), or a module outside the part of a multimodal model that vLLM serves LoRA on."""
    naming = ctx.names.naming
    mapper = f"{naming.architecture}'s hf_to_vllm_mapper ({naming.source})"
    rules = "; ".join(naming.renamer.rules) or "no renames"
    findings = []
    mismatched = [n for _, n in sorted(ctx.module_names.items()) if n.prefix_mismatch]
    if mismatched:
        renames = sorted({_rename(n.adapter, n.nearest_base.removesuffix(".weight")) for n in mismatched})
        findings.append(
            Finding(
                "engine_name_mismatch",
                "problem",
                f"{len(mismatched)} of {len(ctx.module_names)} adapter modules match no engine module: vLLM renames "
                f"adapter and base names with {mapper}: {rules}, and applies a LoRA only where the renamed names are "
                f"equal; {mismatched[0].side_by_side()}"
                + (f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else "")
                + ". The adapter loads without an error and these modules are never applied: the engine serves the base there",
                f"save the adapter with the module names of the model class the base loads into (rename the keys "
                f"{', '.join(renames)} in {ADAPTER_WEIGHTS}), or pass the base it was trained on (--base)",
                tuple(n.adapter for n in mismatched),
            )
        )
    for role, part in ((TOWER, "vision/audio tower"), (CONNECTOR, "tower-to-language connector")):
        modules = [n.adapter for _, n in sorted(ctx.module_names.items()) if n.matched and n.role == role]
        if not modules:
            continue
        served = (
            f"vLLM 0.32 serves it only when started with enable_tower_connector_lora=True, which {naming.architecture} "
            "supports (lora/model_manager.py:234-247, experimental)"
            if naming.tower_lora
            else f"{naming.architecture} does not support LoRA there in vLLM 0.32 (no supports_tower_connector_lora)"
        )
        findings.append(
            Finding(
                "tower_lora_not_served",
                "warning" if naming.tower_lora else "problem",
                f"LoRA on the {part} ({_abbreviate(_compress(modules), 3)}): by default vLLM applies a multimodal "
                f"model's LoRA to its language model only ({'/'.join(naming.language_model)}); {served}. Without it "
                "images are encoded by the base tower while the trainer used the adapted one; text-only prompts are unaffected",
                "start vLLM with enable_tower_connector_lora=True"
                if naming.tower_lora
                else "train the LoRA on the language model only, or merge the tower's part into the base weights",
                tuple(modules),
            )
        )
    outside = [n.adapter for _, n in sorted(ctx.module_names.items()) if n.matched and n.role == OTHER]
    if outside:
        findings.append(
            Finding(
                "outside_language_model",
                "problem",
                f"{len(outside)} adapter modules lie outside every part vLLM serves LoRA on for {naming.architecture} "
                f"(language model {'/'.join(naming.language_model)}): {_abbreviate(_compress(outside), 3)}; they are never applied",
                "train the LoRA on the language model's modules only",
                tuple(outside),
            )
        )
    return findings


def _rename(adapter: str, base: str) -> str:
    """"thinker.model.layers.0.q_proj", "model.layers.0.q_proj" → "'thinker.model.' → 'model.'" (the
    differing prefixes of two names that end alike)."""
    a, b = adapter.split("."), base.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[-1 - common] == b[-1 - common]:
        common += 1
    old, new = ".".join(a[: len(a) - common]), ".".join(b[: len(b) - common])
    return f"'{PEFT_PREFIX}{old + '.' if old else ''}' → '{PEFT_PREFIX}{new + '.' if new else ''}'"


def _check_unrecognized(ctx: _Context) -> list[Finding]:
    other = [t.name for t in ctx.adapter.other]
    if not other:
        return []
    return [
        Finding(
            "unrecognized_tensor",
            "problem",
            f"{len(other)} adapter tensors are neither LoRA A/B nor a saved module: {_abbreviate(other, 3)}; "
            "vLLM 0.32 fails the load on them ('... is unsupported LoRA weight', lora/utils.py:220)",
            "save the adapter with PEFT's save_pretrained (plain LoRA, no trainable tokens or extra parameters)",
            tuple(other),
        )
    ]


def _check_nan_inf(ctx: _Context) -> list[Finding]:
    found = ctx.adapter.nonfinite()
    if not found:
        return []
    nan, inf = sum(n for n, _ in found.values()), sum(i for _, i in found.values())
    bad = [f"{key} ({n} NaN, {i} Inf)" for key, (n, i) in found.items()]
    modules = sorted({_module_of(key) for key in found})
    return [
        Finding(
            "nan_inf",
            "problem",
            f"{nan} NaN and {inf} Inf values in {len(bad)} adapter tensors of {len(modules)} modules "
            f"({_abbreviate(_compress(modules), 4)}): {_abbreviate(bad, 3)}; a policy whose training diverged: "
            "the engine and the trainer would both compute NaN there, so nothing can be measured",
            "do not sync this checkpoint: resume from an earlier one and look for the diverging step (lr, loss scale)",
            tuple(found),
        )
    ]


def _module_of(key: str) -> str:
    """"model.layers.1.self_attn.q_proj.lora_B.weight" → "model.layers.1.self_attn.q_proj"."""
    return re.split(r"\.(lora_|token_adapter\.|base_layer\.|modules_to_save\.)", key)[0]


def _check_dtype(ctx: _Context) -> list[Finding]:
    base = ctx.base.dtype
    dtypes = sorted({t.dtype_name for factors in ctx.adapter.lora_modules.values() for t in factors.values()})
    if base is None or dtypes == [base]:
        return []
    others = [d for d in dtypes if d != base]
    cast = (
        f"vLLM casts LoRA A/B to the model dtype (lora_dtype 'auto' = model dtype, config/lora.py:138; "
        f"lora/lora_model.py:169,173), i.e. {base} with --dtype auto"
    )
    if base == "float32":
        cast = (
            "vLLM casts LoRA A/B to the model dtype (config/lora.py:138; lora/lora_model.py:169,173); with --dtype auto "
            "a float32 base itself runs in float16/bfloat16 (config/model.py:2423)"
        )
    half_swap = any(d in HALF_PRECISION for d in others) and base in HALF_PRECISION
    return [
        Finding(
            "dtype_mismatch",
            "warning" if half_swap else "info",
            f"adapter tensors are {'/'.join(dtypes)}, base is {base}: {cast}; PEFT computes the LoRA path in "
            f"the adapter's dtype{' — float16 and bfloat16 differ in range and precision' if half_swap else ''}",
            f"expected rounding, not a sync bug: compare in the engine's dtype (lora-doctor check --dtype {base})"
            if base in HALF_PRECISION
            else "expected rounding, not a sync bug: run the engine with --dtype float32 to compare exactly",
            tuple(others),
        )
    ]


def _check_rslora(ctx: _Context) -> list[Finding]:
    if not ctx.config.get("use_rslora"):
        return []
    r, alpha = ctx.spec.r, ctx.spec.lora_alpha
    rs, plain = alpha / math.sqrt(r), alpha / r
    return [
        Finding(
            "rslora",
            "info",
            f"rsLoRA: scaling alpha/sqrt(r) = {rs:g} (not alpha/r = {plain:g}); vLLM 0.32 honours use_rslora "
            f"(lora/peft_helper.py:117-120), an engine or sync path that ignores it is off by sqrt(r) = {math.sqrt(r):g}",
            "make sure every sync path uses alpha/sqrt(r) (lora-doctor check measures the effective scale)",
            ("use_rslora",),
        )
    ]


def _check_fan_in_fan_out(ctx: _Context) -> list[Finding]:
    if not ctx.config.get("fan_in_fan_out"):
        return []
    return [
        Finding(
            "fan_in_fan_out",
            "info",
            "fan_in_fan_out=True (Conv1D-style base weights, in × out): vLLM 0.32 ignores the flag (no such "
            "PEFTHelper field, lora/peft_helper.py:27-51) and applies x·Aᵀ·Bᵀ like PEFT's forward; code that "
            "merges or syncs ΔW = s·B·A into the base weights must transpose it",
            "transpose ΔW when merging into in × out weights",
            ("fan_in_fan_out",),
        )
    ]


# --------------------------------------------------------------------------- text helpers


def _compress(modules: list[str]) -> list[str]:
    """"model.layers.3.self_attn.q_proj" ×N → "model.layers.*.self_attn.q_proj (N)"; a lone name stays whole."""
    groups: dict[str, list[str]] = {}
    for module in modules:
        groups.setdefault(re.sub(r"\.(\d+)\.", ".*.", module), []).append(module)
    return [f"{key} ({len(names)})" if len(names) > 1 else names[0] for key, names in groups.items()]


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def _abbreviate(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")
