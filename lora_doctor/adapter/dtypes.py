"""The one table of dtypes: safetensors' codes, torch's dtypes and the names users and reports use."""

from __future__ import annotations

import torch

# Every dtype a safetensors header may name that lora-doctor reads (safetensors' own codes).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# The precisions a reference, an engine or a trainer's merge can compute in.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_PRECISION = ("float16", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def safetensors_dtype_name(code: str) -> str:
    """A safetensors header's "BF16" → "bfloat16"; an unknown code lower-cased."""
    dtype = SAFETENSORS_DTYPES.get(code)
    return dtype_name(dtype) if dtype is not None else code.lower()
