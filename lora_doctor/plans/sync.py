"""The handle a sync plan drives: the operations a trainer performs on its engine.

A plan is a Python function that receives a `Sync` and calls, in the trainer's order:

- `load_base()`: full sync of the unmerged base weights `W0`;
- `load_merged(scale=1.0, decoder_layers=None, dtype=None, cycles=0)`: full sync of `W0 + scale·ΔW` merged
  in `dtype` (default: the engine's, as the trainer holds its weights), optionally for some decoder
  layers only, optionally after `cycles` merge/unmerge rounds (precision drift);
- `add_adapter(id=None, load_inplace=False, weights="current")`: adapter sync of the checkpoint's
  adapter ("current"), of `--previous` ("previous"), or of any adapter folder (a path); later probes
  generate with it. Each id gets its own name and folder on the first add; an adapter re-added under
  an id it already has keeps them (the trainer rewrote its folder), as trainers do;
- `drop_adapter()`: later probes generate without an adapter;
- `reload_from_disk()`: the engine reloads its base from its model folder (sleep-mode wake-up);
- `rollout()`: generate from the check's prompts on the current route, as the trainer does between
  syncs (it fills the engine's prefix cache);
- `reset_cache()`: forget the engine's prefix cache (`reset_prefix_cache()`);
- `probe(name)`: measure the engine now against the checkpoint's `W0 + ΔW` and record a phase.

Each operation does only what it says: no sync resets the prefix cache unless the plan calls
`reset_cache()`, exactly where the trainer it replays does.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..adapter.checkpoint import ADAPTER_CONFIG, Checkpoint, LoraSpec, adapter_spec
from ..adapter.dtypes import COMPUTE_DTYPES
from ..adapter.lora_delta import LoraFactors, MergedWeights, load_merge_factors
from ..adapter.weight_files import StreamedWeights
from ..engine.driver import Engine
from ..errors import BadInput
from ..measure.reference import Reference
from ..result import PhaseResult


class Sync:
    """Engine operations in a trainer's terms. The expected policy is always the checkpoint's `W0 + ΔW`."""

    def __init__(
        self,
        engine: Engine,
        checkpoint: Checkpoint,
        reference: Reference,
        measure: Callable[[str, object], PhaseResult],
        previous: Checkpoint | None = None,
        prompts: list[list[int]] | None = None,
        max_new_tokens: int = 32,
    ):
        self.engine = engine
        self.checkpoint = checkpoint
        self.previous = previous
        self.reference = reference
        self._measure = measure
        self._merge_factors: dict[str, LoraFactors] | None = None
        self.lora_request = None
        self.phases: list[PhaseResult] = []
        self.prompts = prompts or []
        self._added: set[int] = set()
        self.max_new_tokens = max_new_tokens
        # Per adapter id, the folder the engine was given for it (removed with the handle).
        self._folders = tempfile.TemporaryDirectory(prefix="lora-doctor-adapters-")

    def close(self) -> None:
        """Remove the adapter folders given to the engine (the engine is closed, or another plan runs)."""
        self._folders.cleanup()

    def load_base(self) -> None:
        """Full sync of the unmodified base weights `W0` (the LoRA kept aside)."""
        self.engine.load_weights(self._base_weights())

    def load_merged(
        self,
        scale: float = 1.0,
        decoder_layers: set[int] | None = None,
        dtype: str | None = None,
        cycles: int = 0,
    ) -> None:
        """Full sync of merged weights `W0 + scale·ΔW`, as a trainer whose weights live in `dtype`
        (default: the engine's) merges them: `merge_in_dtype`, so in bf16 what is below half an ulp
        of W0 is lost, exactly as in the trainer.

        `decoder_layers` limits the merge to some decoder layers. With `cycles`, the weights are merged then
        unmerged that many times before the final merge: the rounding drift of trl #6688.
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            # Checked here, not where the engine's workers form the weights: the plan's misuse, named at its line.
            raise TypeError(f"load_merged: scale must be a number, got {scale!r}")
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise BadInput(f"load_merged: unknown dtype {dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}")
        precision = COMPUTE_DTYPES[dtype] if dtype is not None else self.engine.llm.llm_engine.model_config.dtype
        base = self.checkpoint.base()
        weights = MergedWeights(base.tensors, self._factors(), precision, scale, decoder_layers, cycles, self._trained_copies())
        self.engine.load_weights(weights)

    def reload_from_disk(self) -> None:
        """The engine reloads its base from its model folder (what sleep-mode wake-up does)."""
        self.engine.reload_from_disk()

    def add_adapter(self, id: int | None = None, load_inplace: bool = False, weights: str | Path = "current") -> int:
        """Adapter sync; `weights` is "current", "previous" (needs --previous) or an adapter folder."""
        int_id = self.engine.new_adapter_id() if id is None else id
        source, spec = self._adapter(weights)
        folder = self._publish(source, int_id)
        self.lora_request = self.engine.add_adapter(folder, int_id, load_inplace, source=source, rank=spec.max_rank)
        self._added.add(int_id)
        return int_id

    def rollout(self) -> None:
        """Generate from the check's prompts on the current route, as the trainer does between syncs."""
        self.engine.greedy(self.prompts, self.max_new_tokens, self.lora_request)

    def reset_cache(self) -> None:
        """Forget every KV block the engine's prefix cache holds (`reset_prefix_cache()`)."""
        self.engine.reset_prefix_cache()

    def drop_adapter(self) -> None:
        """Generate without an adapter from now on (the engine's weights alone)."""
        self.lora_request = None

    def probe(self, name: str) -> PhaseResult:
        """Measure the engine now, as the trainer would generate, and record it as a phase."""
        loaded = bool(self._added & self.engine.loaded_adapters()) if self.engine.lora_enabled else False
        result = self._measure(name, self.lora_request, loaded)
        self.phases.append(result)
        return result

    def _publish(self, source: Path, int_id: int) -> Path:
        """The folder of adapter id `int_id`, now holding the files of `source` (linked, not copied):
        the same folder for the same id, as a trainer that rewrites its adapter folder at every sync."""
        folder = Path(self._folders.name) / f"adapter-{int_id}"
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for file in source.iterdir():
            if file.is_file():
                os.symlink(file.resolve(), folder / file.name)
        return folder

    def _adapter(self, weights: str | Path) -> tuple[Path, LoraSpec]:
        """The folder of the adapter to sync and its validated spec: the opened checkpoint's or
        --previous's, else the plan's own folder's (its config read here, once per add: a trainer may
        rewrite it between adds)."""
        if weights == "current":
            return self.checkpoint.adapter_dir, self.checkpoint.spec
        if weights == "previous":
            if self.previous is None:
                raise BadInput("this plan syncs the previous adapter: pass --previous <older checkpoint>")
            return self.previous.adapter_dir, self.previous.spec
        path = Path(weights)
        if not (path / ADAPTER_CONFIG).is_file():
            raise BadInput(f"add_adapter: {path} is not an adapter folder (no {ADAPTER_CONFIG})")
        return path, adapter_spec(path)

    def _base_weights(self) -> StreamedWeights:
        return StreamedWeights(self.checkpoint.base().tensors)

    def _factors(self) -> dict[str, LoraFactors]:
        if self._merge_factors is None:
            # Keyed by the base's weight names: an adapter may name a module otherwise (a multimodal
            # base saved as `model.layers.*` whose adapter says `model.language_model.layers.*`); the
            # embedding's LoRA, trainable tokens and a tied head's LoRA land on the embedding weight.
            # Factors, not ΔW: a dense ΔW per module would be a copy of every targeted weight.
            self._merge_factors = load_merge_factors(self.checkpoint, self.checkpoint.base())
        return self._merge_factors

    def _trained_copies(self) -> dict[str, torch.Tensor]:
        adapter = self.checkpoint.adapter()
        copies = adapter.trained_copies()
        values = adapter.read(list(copies.values()))
        return {name: values[info.name] for name, info in copies.items()}

