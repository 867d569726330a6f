"""`inspect_checkpoint`: every pre-flight check on one opened checkpoint, in one report."""

from __future__ import annotations

from pathlib import Path

from ..adapter.checkpoint import Checkpoint, open_checkpoint
from ..errors import BadInput
from . import fit, refusals, scaling, values
from .context import Context
from .findings import SEVERITIES, Finding, PreflightReport

# Every check, in the order its findings are listed within a severity.
CHECKS = (
    refusals.check_modules_to_save,
    refusals.check_embedding_loras,
    refusals.check_dora,
    refusals.check_unsupported_features,
    refusals.check_bias,
    scaling.check_patterns,
    refusals.check_rank,
    fit.check_fit,
    fit.check_engine_names,
    refusals.check_unrecognized,
    refusals.check_trainable_tokens,
    values.check_nan_inf,
    values.check_untrained,
    values.check_dtype,
    scaling.check_rslora,
    scaling.check_fan_in_fan_out,
)


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
    ctx = Context(checkpoint.spec, checkpoint.config, checkpoint.adapter(), checkpoint.base(), max_lora_rank, checkpoint.names)
    findings: list[Finding] = [finding for check in CHECKS for finding in check(ctx)]
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return PreflightReport(checkpoint=dict(checkpoint.summary(detailed=True), max_lora_rank=max_lora_rank), findings=findings)
