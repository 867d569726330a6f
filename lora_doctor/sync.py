"""The handle a sync plan drives: the operations a trainer performs on its engine."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .engine import Engine
from .reference import Reference
from .result import PhaseResult

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class Sync:
    """Engine operations in a trainer's terms; `probe(name)` measures the engine as it is now.

    The trainer's expected policy is always the checkpoint's `W0 + ΔW`. `probe` generates the way
    the trainer does right after its sync: with the adapter it last added, unless told otherwise.
    """

    def __init__(
        self,
        engine: Engine,
        checkpoint: Checkpoint,
        reference: Reference,
        measure: Callable[[str, object], PhaseResult],
    ):
        self.engine = engine
        self.checkpoint = checkpoint
        self.reference = reference
        self._measure = measure
        self._delta: dict[str, torch.Tensor] | None = None
        self.lora_request = None
        self.phases: list[PhaseResult] = []

    def load_base(self) -> None:
        """Full sync of the unmodified base weights `W0` (the LoRA kept aside)."""
        self.engine.load_weights(self._base_weights())

    def load_merged(self, scale: float = 1.0, layers: set[int] | None = None) -> None:
        """Full sync of merged weights `W0 + scale·ΔW` (optionally only for some decoder layers)."""
        delta = self._deltas()

        def merged() -> Iterator[tuple[str, torch.Tensor]]:
            for name, weight in self._base_weights():
                if name in delta and _in_layers(name, layers):
                    weight = weight.float() + scale * delta[name]
                yield name, weight

        self.engine.load_weights(merged())

    def reload_from_disk(self) -> None:
        """The engine reloads its base from its model folder (what sleep-mode wake-up does)."""
        self.engine.reload_from_disk()

    def add_adapter(self, id: int | None = None, load_inplace: bool = False, path: str | Path | None = None) -> int:
        """Adapter sync: register an adapter folder (the checkpoint's by default); later probes use it."""
        int_id = self.engine.new_adapter_id() if id is None else id
        self.lora_request = self.engine.add_adapter(Path(path or self.checkpoint.adapter_dir), int_id, load_inplace)
        return int_id

    def drop_adapter(self) -> None:
        """Generate without an adapter from now on (the engine's weights alone)."""
        self.lora_request = None

    def probe(self, name: str) -> PhaseResult:
        """Measure the engine now, as the trainer would generate, and record it as a phase."""
        result = self._measure(name, self.lora_request)
        self.phases.append(result)
        return result

    def _base_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in sorted(self.checkpoint.base_dir.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

    def _deltas(self) -> dict[str, torch.Tensor]:
        if self._delta is None:
            self._delta = {name: delta.float() for name, delta in self.reference.delta_weights()}
        return self._delta


def _in_layers(name: str, layers: set[int] | None) -> bool:
    if layers is None:
        return True
    match = _LAYER_INDEX.search(name)
    return match is not None and int(match.group(1)) in layers
