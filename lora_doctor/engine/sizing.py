"""Sizing the engine for a check, before anything loads: its LoRA rank, model length and tensor-parallel fit."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..adapter.checkpoint import Checkpoint
from ..adapter.dtypes import COMPUTE_DTYPES
from ..errors import BadInput
from .driver import EngineConfig
from .platform import kv_cache_bytes_needed
from .serving import vllm_lora_ranks


def engine_config(
    ckpt: Checkpoint,
    limit: int | None,
    token_ids,
    max_new_tokens: int,
    dtype: str,
    tensor_parallel_size: int,
    kv_cache_gib: int | None,
    also_loaded: Sequence[Checkpoint] = (),
) -> EngineConfig:
    """The engine a check needs: the smallest LoRA rank vLLM accepts that holds every adapter the check
    will load that it knows of (the checkpoint's, and `also_loaded`: --previous), a model length for
    the longest prompt and its continuation."""
    # vLLM accepts only some max_lora_rank values: size the engine to the smallest that holds the adapters.
    allowed, _default = vllm_lora_ranks()
    highest = max([ckpt, *also_loaded], key=lambda each: each.spec.max_rank)
    lora_rank = next((r for r in allowed if r >= highest.spec.max_rank), None)
    if lora_rank is None:
        raise BadInput(f"LoRA rank {highest.spec.max_rank} of {highest.adapter_dir} is above the largest rank vLLM serves ({allowed[-1]})")
    needed = max(len(ids) for ids in token_ids) + max_new_tokens + 1
    limit = limit or needed
    weights, kv = memory_needed(ckpt, dtype, sum(len(ids) + max_new_tokens for ids in token_ids))
    return EngineConfig(
        dtype=dtype,
        max_lora_rank=lora_rank,
        max_model_len=min(limit, max(needed, 256)),
        tensor_parallel_size=tensor_parallel_size,
        kv_cache_gib=kv_cache_gib,
        weights_bytes=weights,
        kv_bytes_needed=kv,
    )


def memory_needed(ckpt: Checkpoint, dtype: str, tokens: int) -> tuple[int, int]:
    """(bytes of the base's weights at `dtype`, bytes of KV cache for `tokens` positions): what the
    engine's memory plan on CUDA starts from (engine/platform.py)."""
    base = ckpt.base()
    size = COMPUTE_DTYPES[dtype].itemsize
    weights = sum(math.prod(t.shape) * size for t in base.tensors.values())
    config = base.text_config or base.config
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or (int(config.get("hidden_size") or 0) // heads))
    return weights, kv_cache_bytes_needed(layers, kv_heads, head_dim, size, tokens)


def check_parallel_fit(ckpt: Checkpoint, tensor_parallel_size: int) -> None:
    """Refuse a tensor-parallel size the model cannot be split into, before anything loads.

    vLLM splits attention heads and the MLP's intermediate rows evenly across ranks; key/value
    heads may instead be replicated when there are fewer of them than ranks.
    """
    if tensor_parallel_size == 1:
        return
    config = ckpt.base().config
    config = config.get("text_config", config)
    option = f"--tensor-parallel-size {tensor_parallel_size}"
    heads = config.get("num_attention_heads")
    if heads and heads % tensor_parallel_size:
        raise BadInput(f"{option} does not divide the model's {heads} attention heads; use a divisor of {heads}")
    kv_heads = config.get("num_key_value_heads") or heads
    if kv_heads and kv_heads % tensor_parallel_size and tensor_parallel_size % kv_heads:
        raise BadInput(f"{option} and the model's {kv_heads} key/value heads: one must divide the other")
    intermediate = config.get("intermediate_size")
    if intermediate and intermediate % tensor_parallel_size:
        raise BadInput(f"{option} does not divide the model's intermediate size {intermediate}")
