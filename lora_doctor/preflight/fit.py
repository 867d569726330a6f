"""Whether the adapter fits its base (a weight of each module's shape) and the engine's module names (a
module vLLM's mapper sends nowhere, or to a part it serves no LoRA on, is never applied)."""

from __future__ import annotations

from ..adapter.inventory import ADAPTER_WEIGHTS, PEFT_PREFIX
from ..adapter.names import CONNECTOR, OTHER, TOWER
from .context import Context
from .findings import Finding
from .text import abbreviate, compress


def check_fit(ctx: Context) -> list[Finding]:
    missing, mismatched, details = [], [], []
    fan_in_fan_out = ctx.spec.fan_in_fan_out
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
                f"{abbreviate(compress(missing), 4)}; an engine refuses or silently skips them",
                "pass the base the adapter was trained on (--base), or remove these modules from the adapter",
                tuple(missing),
            )
        )
    if mismatched:
        findings.append(
            Finding(
                "shape_mismatch",
                "problem",
                f"{len(mismatched)} adapter modules do not fit base {ctx.base_dir}: {abbreviate(details, 2)}",
                "pass the base the adapter was trained on (--base); check hidden/intermediate sizes and vocab resizing",
                tuple(mismatched),
            )
        )
    return findings


def check_engine_names(ctx: Context) -> list[Finding]:
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
                f"LoRA on the {part} ({abbreviate(compress(modules), 3)}): by default vLLM applies a multimodal "
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
                f"(language model {'/'.join(naming.language_model)}): {abbreviate(compress(outside), 3)}; they are never applied",
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
