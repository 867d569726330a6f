"""How findings name many modules in one line."""

from __future__ import annotations

import re


def compress(modules: list[str]) -> list[str]:
    """"model.layers.3.self_attn.q_proj" ×N → "model.layers.*.self_attn.q_proj (N)"; a lone name stays whole."""
    groups: dict[str, list[str]] = {}
    for module in modules:
        groups.setdefault(re.sub(r"\.(\d+)\.", ".*.", module), []).append(module)
    return [f"{key} ({len(names)})" if len(names) > 1 else names[0] for key, names in groups.items()]


def num(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def abbreviate(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")
