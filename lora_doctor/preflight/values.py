"""What the adapter's values hold: NaN or Inf, an untrained LoRA (every B zero), and a dtype other than the base's."""

from __future__ import annotations

import re

from ..adapter.dtypes import HALF_PRECISION
from .context import Context
from .findings import Finding
from .text import abbreviate, compress


def check_nan_inf(ctx: Context) -> list[Finding]:
    found = ctx.adapter.nonfinite(ctx.values)
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
            f"({abbreviate(compress(modules), 4)}): {abbreviate(bad, 3)}; a policy whose training diverged: "
            "the engine and the trainer would both compute NaN there, so nothing can be measured",
            "do not sync this checkpoint: resume from an earlier one and look for the diverging step (lr, loss scale)",
            tuple(found),
        )
    ]


def _module_of(key: str) -> str:
    """"model.layers.1.self_attn.q_proj.lora_B.weight" → "model.layers.1.self_attn.q_proj"."""
    return re.split(r"\.(lora_|token_adapter\.|base_layer\.|modules_to_save\.)", key)[0]


def check_untrained(ctx: Context) -> list[Finding]:
    if not ctx.adapter.untrained(ctx.values):
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


def check_dtype(ctx: Context) -> list[Finding]:
    base = ctx.base.dtype
    dtypes = ctx.adapter.lora_dtypes
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
