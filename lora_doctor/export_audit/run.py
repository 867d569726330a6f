"""`audit`: verify a merged export (the LoRA merged into the base and saved) without an engine: one phase,
`export`, judged by the check's verdict rules and named from the catalog."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from ..adapter.checkpoint import load_checkpoint
from ..adapter.inventory import folder_ties_embeddings
from ..adapter.lora_delta import load_merge_factors
from ..adapter.modules import layer_index, module_kind
from ..adapter.weight_files import model_tensors
from ..catalog import DIVERGED, EXPORT_PHASE, FAIL, OK, PARTIAL, SCALED
from ..catalog import explanation as catalog_explanation
from ..environment import environment
from ..errors import BadInput, out_of_memory_is_environment
from ..measure.verdict import Thresholds, describe_modules, layer_verdict, overall_verdict, refine_with_layers, scale_hint
from ..result import ModuleResult, PhaseResult, Report
from ..version import __version__
from .figures import ModuleFigures
from .stream import Progress, one_compute_thread, stream
from .tensors import Difference, Pair, pair_tensors

PHASE = EXPORT_PHASE
# How many differing untouched tensors the report names.
SHOWN_DIFFERENCES = 5
_LORA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@out_of_memory_is_environment("audit the export")
def audit(
    export: str | Path,
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    thresholds: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> Report:
    """Compare a merged export with its base and adapter: a report with one phase named `export`.

    `thresholds` overrides the defaults for the export's dtype (names of `Thresholds`). Raises
    `BadInput` when the export, the adapter or the base cannot be used.
    """
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    ckpt = load_checkpoint(adapter, base)
    export_dir = Path(export)
    exported = model_tensors(export_dir)
    # Every ΔW the merge writes, by the base's module name: the linear LoRA's, and the embedding's
    # (its LoRA, trainable tokens, the LoRA of a head tied to it).
    factors = {key.removesuffix(".weight"): lora for key, lora in load_merge_factors(ckpt, ckpt.base()).items()}
    expected = dict(ckpt.base().tensors, **ckpt.adapter().trained_copies())
    pairs, absent = pair_tensors(
        exported, expected, factors, export_dir, ckpt.base_dir, export_ties=folder_ties_embeddings(export_dir), base_ties=ckpt.base().ties_embeddings
    )
    limits = _thresholds(pairs, thresholds or {})

    streaming = time.perf_counter()
    with one_compute_thread():
        figures, differences = stream(pairs, factors, say)
    streaming = time.perf_counter() - streaming
    differences = absent + differences
    layers = [_layer(f, limits) for f in sorted(figures, key=lambda f: _module_order(f.module))]
    verdict = refine_with_layers(OK, [layer.verdict for layer in layers])
    if differences and verdict == OK:
        verdict = DIVERGED
    # All modules together: Σ<W_m − W0, ΔW> / Σ<D, ΔW>.
    kept = sum(f.kept_delta for f in figures)
    scale = 1.0 + sum(f.e_delta for f in figures) / kept if kept > 0 else None
    seconds = time.perf_counter() - started

    phase = PhaseResult(
        index=0,
        name=PHASE,
        with_adapter=False,
        verdict=verdict,
        explanation=_explain(verdict, scale, layers, differences, ckpt.spec),
        effective_scale=scale,
        # Logit figures need an engine; an audit reads weights only.
        kl_at_scale=None,
        kl_mean=None,
        kl_max=None,
        top1_agreement=None,
        greedy_match=None,
        layers=layers,
        seconds={"read_and_compare": streaming},
        measured=EXPORT_PHASE,
    )
    summary = ckpt.summary()
    summary["export"] = {
        "path": str(export_dir.resolve()),
        "files": len({info.path for info in exported.values()}),
        "tensors": len(exported),
        "dtypes": sorted({info.dtype_name for info in exported.values()}),
        "lora_modules": len(figures),
        "untouched_tensors": sum(pair.module is None for pair in pairs),
        "differing_untouched": len(differences),
        "first_differences": [d.to_dict() for d in differences[:SHOWN_DIFFERENCES]],
        "max_rounding_floor": max((f.rounding_floor for f in figures), default=0.0),
        # Modules per correct merge they were judged against (two kinds for a float32 base's bf16 export).
        "merged": dict(Counter(f.merge for f in figures)),
        "bytes_read": sum(pair.export.nbytes + pair.base.nbytes for pair in pairs),
    }
    final = overall_verdict([verdict])
    return Report(
        tool={"name": "lora-doctor", "version": __version__},
        environment=environment(),
        checkpoint=summary,
        plan={"name": "audit", "summary": "a merged export on disk compared with base + adapter (no engine)", "phases": [PHASE]},
        thresholds=limits.as_dict(),
        phases=[phase],
        verdict=final,
        exit_code=1 if final == FAIL else 0,
        seconds={"audit": seconds},
    )


def _thresholds(pairs: list[Pair], overrides: dict[str, float]) -> Thresholds:
    """Defaults for the lowest precision among the export's LoRA-targeted weights, then overrides."""
    dtypes = {pair.export.dtype for pair in pairs if pair.module is not None}
    name = "bfloat16" if torch.bfloat16 in dtypes else "float16" if torch.float16 in dtypes else "float32"
    try:
        return Thresholds.for_dtype(name).override(overrides)
    except ValueError as error:
        raise BadInput(f"--threshold: {error}") from None


def _layer(figures: ModuleFigures, limits: Thresholds) -> ModuleResult:
    # In a low-precision export every element of W_m is rounded: a correct export rounded in another
    # order than the merge judged against (W0 + ΔW rounded once, or each part rounded as PEFT does)
    # differs from it by up to an ulp per element. So, as for a check's base, residual and divergence
    # may reach `rounding_margin` ulps of every element (`rounding`, over ‖D‖) above `layer_divergence`.
    allowed = limits.override({"layer_divergence": limits.layer_divergence + limits.rounding_margin * figures.rounding})
    values = (figures.effective_scale, figures.residual, figures.divergence)
    return ModuleResult(figures.module, *values, verdict=layer_verdict(*values, allowed))


def _module_order(module: str) -> tuple:
    kind = module_kind(module)
    index = layer_index(module)
    return (index if index is not None else -1, _LORA_KINDS.index(kind) if kind in _LORA_KINDS else len(_LORA_KINDS), module)


def _explain(verdict: str, scale: float | None, layers: list[ModuleResult], differences: list[Difference], spec) -> str:
    explanation = catalog_explanation(verdict, EXPORT_PHASE)
    if verdict == SCALED and scale is not None:
        hint = scale_hint(scale, spec.r, spec.lora_alpha, spec.use_rslora)
        explanation = f"{explanation}: α = {scale:.3f}" + (f" {hint}" if hint else "")
    if verdict != OK and any(layer.verdict != OK for layer in layers):
        detail = describe_modules([(layer.module, layer.verdict) for layer in layers])
        explanation = f"{detail} — {explanation}" if verdict == PARTIAL else f"{explanation}; {detail}"
    if differences:
        shown = ", ".join(f"{d.name} ({d.reason})" for d in differences[:SHOWN_DIFFERENCES])
        more = f" and {len(differences) - SHOWN_DIFFERENCES} more" if len(differences) > SHOWN_DIFFERENCES else ""
        explanation += f"; {len(differences)} tensors the LoRA does not touch are not the base's: {shown}{more}"
    return explanation
