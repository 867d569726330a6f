"""The per-module grid every renderer shows: a row per decoder layer, a column per module kind."""

from __future__ import annotations

from ..modules import layer_index, module_kind
from ..result import LayerResult, PhaseResult


def layer_label(module: str) -> str:
    """"model.layers.3.self_attn.q_proj" → "3"; a module without a layer index keeps its parent's name."""
    index = layer_index(module)
    if index is not None:
        return str(index)
    return module.rpartition(".")[0] or module


def layer_grid(layers: list[LayerResult]) -> tuple[list[str], list[tuple[str, dict[str, LayerResult]]]]:
    """Module kinds in report order, and a row per layer label mapping kind → module (report order)."""
    kinds: list[str] = []
    rows: dict[str, dict[str, LayerResult]] = {}
    for layer in layers:
        kind = module_kind(layer.module)
        if kind not in kinds:
            kinds.append(kind)
        rows.setdefault(layer_label(layer.module), {})[kind] = layer
    return kinds, list(rows.items())


def wrong_layers(phase: PhaseResult) -> list[LayerResult]:
    return [layer for layer in phase.layers if layer.verdict != "ok"]
