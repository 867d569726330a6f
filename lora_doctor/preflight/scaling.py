"""How ΔW is scaled, where an engine or a sync path may scale it otherwise: rank and alpha patterns,
rsLoRA, and fan_in_fan_out's transposed layout."""

from __future__ import annotations

import math

from ..adapter.checkpoint import pattern_key
from .context import Context
from .findings import Finding
from .text import abbreviate, compress, num


def check_patterns(ctx: Context) -> list[Finding]:
    findings = []
    global_scaling = ctx.spec.scaling
    modules = sorted(ctx.adapter.lora_modules)
    for code, key, label in (("rank_pattern", "rank_pattern", "r"), ("alpha_pattern", "alpha_pattern", "alpha")):
        patterns = getattr(ctx.spec, key)
        if not patterns:
            continue
        parts, subjects = [], []
        for pattern, value in patterns.items():
            hits = [m for m in modules if pattern_key(patterns, m) == pattern]
            subjects.extend(hits)
            if not hits:
                parts.append(f"{pattern!r}→{label}={num(value)} hits no module")
                continue
            scalings = sorted({ctx.spec.scaling_for(m) for m in hits})
            parts.append(
                f"{pattern!r}→{label}={num(value)} on {abbreviate(compress(hits), 3)}: scaling "
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


def check_rslora(ctx: Context) -> list[Finding]:
    if not ctx.spec.use_rslora:
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


def check_fan_in_fan_out(ctx: Context) -> list[Finding]:
    if not ctx.spec.fan_in_fan_out:
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
