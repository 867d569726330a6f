"""Names of a model's modules: which decoder layer a module sits in, and its kind (q_proj, ...)."""

from __future__ import annotations

import re

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """"model.layers.3.self_attn.q_proj(.weight)" → 3; None for a module outside the decoder layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def module_kind(module: str) -> str:
    """"model.layers.3.self_attn.q_proj" → "q_proj"."""
    return module.rpartition(".")[2] or module
