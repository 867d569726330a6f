"""`audit`: verify a merged export (the LoRA merged into the base and saved) without an engine.

Per module the adapter targets, the export's weight W_m is compared with what a correct merge in the
export's dtype holds, E = merge_in_dtype(W0, ΔW, dtype): W0 + ΔW in float32, round_bf16(W0 + ΔW) in a
bf16 export, which keeps only the part D = E − W0 of ΔW that bf16 can represent. The check's
per-module figures, measured against that kept part (identical to the check's in float32):

    effective_scale = <W_m − W0, ΔW> / <D, ΔW>          1 merged once, 2 twice, 0 not merged
    residual        = ‖W_m − W0 − effective_scale·D‖ / ‖D‖   what no multiple of the merge explains
    divergence      = ‖W_m − E‖ / ‖D‖

Every other tensor must equal the base (cast to the export's dtype). Weights stream from disk in row
chunks and every figure is a sum over chunks, so memory does not grow with the model. No vLLM import.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from .adapter.checkpoint import load_checkpoint
from .adapter.inventory import ties_embeddings
from .adapter.lora_delta import LoraFactors, load_merge_factors, merge_in_dtype
from .adapter.modules import layer_index, module_kind
from .adapter.weight_files import TensorInfo, model_tensors, read_chunks
from .catalog import DIVERGED, EXPORT_PHASE, FAIL, OK, PARTIAL, SCALED
from .catalog import explanation as catalog_explanation
from .environment import environment
from .errors import BadInput, out_of_memory_is_environment
from .measure.bf16_sums import bf16_sums
from .measure.verdict import (
    Thresholds,
    describe_modules,
    layer_verdict,
    overall_verdict,
    refine_with_layers,
    scale_hint,
)
from .result import ModuleResult, PhaseResult, Report
from .version import __version__

PHASE = EXPORT_PHASE
# Bytes of one tensor per read. The export and the base are read in turn; from a cold page cache,
# 1 MiB reads alternating between two files ran at half a plain sequential read, 32 MiB reads close to it.
READ_BYTES = 32 * 2**20
# Bytes of one tensor per step of the module arithmetic: small enough that a step's vectors stay in the
# CPU caches (1 MiB measured faster than 256 KiB and than 4 MiB).
STEP_BYTES = 2**20
# In a low-precision export every element of W_m is rounded, so residual and divergence have a floor:
# the module's rounding floor ρ = ‖E − (W0 + ΔW)‖ / ‖D‖ (0.16–0.23 for a bf16 merge at
# ‖ΔW‖/‖W0‖ = 1e-2, ~1e-5 in float32). A correct export rounded another way (W0 + ΔW rounded once,
# rather than PEFT's rounding of each part) measured up to 1.2ρ, a merge applied twice 0.7ρ; so the
# per-module divergence limit is max(layer_divergence, ROUNDING_MARGIN·ρ).
ROUNDING_MARGIN = 2.0
MARGIN_NAME = "export_rounding_margin"
# How many differing untouched tensors the report names.
SHOWN_DIFFERENCES = 5
_LORA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class _Figures:
    """One module's measurements; every norm is relative to ‖D‖ (the part of ΔW the export can hold)."""

    module: str
    e_delta: float  # <W_m − E, ΔW>
    kept_delta: float  # <D, ΔW>
    effective_scale: float
    residual: float
    divergence: float
    rounding_floor: float
    merge: str = "in the export's dtype"  # which correct merge the export is judged against


# A bf16 export of a float32 base is correct in two ways: PEFT's merge of the base loaded in bf16
# (every part rounded: `merge_in_dtype`) or a merge in float32 saved in bf16 (rounded once). With
# ‖ΔW‖/‖W0‖ ≈ 2e-3 most of ΔW is below bf16's half ulp and the two keep different parts of it: judged
# against the other, a correct export measured α 1.23. Both are measured; the closer one is used.
MERGED_IN_BF16 = "in bf16 (PEFT's merge of a bf16 base)"
MERGED_IN_FLOAT32 = "in float32, saved in bf16"


class _Module:
    """One LoRA module while its row chunks arrive: the Gram matrix of e = W_m − E, D = E − W0 and ΔW.

    Every figure follows from the 3×3 sums. A float32 export is judged at 1e-3 and its figures cancel
    (a double merge has ‖W_m − W0 − 2D‖ ~ 1e-7‖D‖ while float32 sums over a chunk err by ~1e-5), so its
    vectors are float64; a half-precision export's limits are ≥ 2e-2, and float32 halves the work.
    """

    def __init__(self, name: str, factors: LoraFactors, shape: tuple[int, ...]):
        out_features, in_features = factors.B.shape[0], factors.A.shape[-1]
        delta_shape = (in_features, out_features) if factors.fan_in_fan_out else (out_features, in_features)
        if delta_shape != tuple(shape):
            raise BadInput(f"the adapter's ΔW of {name} is {delta_shape} but the export's weight is {tuple(shape)}")
        self.name = name
        self.factors = factors
        self.gram = torch.zeros(3, 3, dtype=torch.float64)
        self.gram_once: torch.Tensor | None = None  # a float32 base's bf16 export merged in float32
        # ΔW's rows [start, end) = scaling · left[start:end] @ right: `LoraFactors.delta` as one GEMM into
        # a reused buffer (the GEMM's alpha gives the same float32 values as multiplying afterwards).
        if factors.fan_in_fan_out:
            self._left, self._right = factors.A.float().T.contiguous(), factors.B.float().T.contiguous()
        else:
            self._left, self._right = factors.B.float().contiguous(), factors.A.float().contiguous()
        self._delta = torch.empty(0)

    def add_rows(self, start: int, end: int, merged: torch.Tensor, w0: torch.Tensor) -> None:
        """Rows [start, end) of the export's weight and the base's."""
        delta = self._delta_rows(start, end)
        if merged.dtype == torch.bfloat16 and w0.dtype in (torch.bfloat16, torch.float32):
            self.gram += _gram(bf16_sums(merged, w0, delta))
            if w0.dtype == torch.float32:
                if self.gram_once is None:
                    self.gram_once = torch.zeros(3, 3, dtype=torch.float64)
                self.gram_once += _gram(bf16_sums(merged, w0, delta, once=True))
            return
        expected = merge_in_dtype(w0, delta, merged.dtype)
        precision = torch.float64 if merged.dtype.itemsize >= 4 else torch.float32
        vectors = torch.empty(3, *delta.shape, dtype=precision)
        vectors[0].copy_(merged).sub_(expected)
        vectors[1].copy_(expected).sub_(w0)
        vectors[2].copy_(delta)
        flat = vectors.reshape(3, -1)
        self.gram += (flat @ flat.T).double()

    def _delta_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows of ΔW in float32, in the export weight's layout."""
        size = (end - start) * self._right.shape[1]
        if self._delta.numel() < size:
            self._delta = torch.empty(size)
        rows = self._delta[:size].view(end - start, self._right.shape[1])
        return torch.addmm(rows, self._left[start:end], self._right, beta=0, alpha=self.factors.scaling, out=rows)

    def figures(self) -> _Figures | None:
        if self.gram_once is None:
            return self._figures(self.gram)
        measured = [f for f in (self._figures(self.gram, MERGED_IN_BF16), self._figures(self.gram_once, MERGED_IN_FLOAT32)) if f]
        return min(measured, key=lambda f: f.divergence, default=None)

    def _figures(self, gram: torch.Tensor, merge: str = _Figures.merge) -> _Figures | None:
        (ee, eD, eX), (_, DD, DX), (_, _, XX) = gram.tolist()
        if DX <= 0 or DD <= 0:
            return None  # the export's dtype rounds all of ΔW away: nothing to measure
        shift = eX / DX  # effective_scale − 1
        return _Figures(
            module=self.name,
            e_delta=eX,
            kept_delta=DX,
            effective_scale=1.0 + shift,
            residual=math.sqrt(max(ee - 2 * shift * eD + shift * shift * DD, 0.0) / DD),
            divergence=math.sqrt(ee / DD),
            rounding_floor=math.sqrt(max(DD - 2 * DX + XX, 0.0) / DD),
            merge=merge,
        )


def _gram(sums: tuple[float, ...]) -> torch.Tensor:
    """The 3×3 Gram matrix of (e, D, ΔW) from `bf16_sums`."""
    ee, eD, eX, DD, DX, XX = sums
    return torch.tensor([[ee, eD, eX], [eD, DD, DX], [eX, DX, XX]], dtype=torch.float64)


@dataclass
class _Difference:
    """A tensor the LoRA does not touch that is not the base's."""

    name: str
    reason: str
    elements: int = 0
    max_abs: float = 0.0

    def to_dict(self) -> dict:
        return {"tensor": self.name, "reason": self.reason, "differing_elements": self.elements, "max_abs_difference": self.max_abs}


@dataclass(frozen=True)
class _Pair:
    """An export tensor, the tensor it must match (the base's, or the adapter's trained copy of a
    `modules_to_save` module), and the LoRA module it holds (if any)."""

    name: str
    export: TensorInfo
    base: TensorInfo
    module: str | None


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
    pairs, absent = _pair(exported, expected, factors, export_dir, ckpt.base_dir)
    limits, margin = _thresholds(pairs, thresholds or {})

    streaming = time.perf_counter()
    with _one_compute_thread():
        figures, differences = _stream(pairs, factors, say)
    streaming = time.perf_counter() - streaming
    differences = absent + differences
    layers = [_layer(f, limits, margin) for f in sorted(figures, key=lambda f: _module_order(f.module))]
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
        thresholds={**limits.as_dict(), MARGIN_NAME: margin},
        phases=[phase],
        verdict=final,
        exit_code=1 if final == FAIL else 0,
        seconds={"audit": seconds},
    )


def _pair(exported: dict[str, TensorInfo], based: dict[str, TensorInfo], factors, export_dir: Path, base_dir: Path):
    """Pair the export's tensors with the base's, in the export's on-disk order; list the unpaired."""
    pairs, absent = [], []
    for name in dict.fromkeys([*based, *exported]):
        mine, theirs = _lookup(exported, export_dir, name), _lookup(based, base_dir, name)
        if mine is None:
            absent.append(_Difference(name, "absent from the export"))
            continue
        if theirs is None:
            absent.append(_Difference(name, "not in the base"))
            continue
        if mine.shape != theirs.shape:
            raise BadInput(
                f"{name} is {'x'.join(map(str, mine.shape))} in the export but {'x'.join(map(str, theirs.shape))} "
                f"in base {base_dir}: not an export of this base (pass --base)"
            )
        module = name.removesuffix(".weight") if name.removesuffix(".weight") in factors else None
        if module is not None and not (mine.dtype.is_floating_point and mine.dtype.itemsize >= 2):
            raise BadInput(f"{name} is {mine.dtype} in the export: quantized exports are not supported")
        pairs.append(_Pair(name, mine, theirs, module))
    if not pairs:
        raise BadInput(f"{export_dir} shares no tensor name with base {base_dir}: not an export of this base")
    # Both folders are then read front to back when they are laid out alike.
    pairs.sort(key=lambda pair: (str(pair.export.path), pair.export.start))
    return pairs, absent


def _lookup(tensors: dict[str, TensorInfo], folder: Path, name: str) -> TensorInfo | None:
    """A tensor by name; a model with tied embeddings may leave its lm_head out (it is the embedding)."""
    if name in tensors:
        return tensors[name]
    if name == "lm_head.weight" and _ties_embeddings(folder):
        return tensors.get("model.embed_tokens.weight")
    return None


def _ties_embeddings(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return ties_embeddings(config) if isinstance(config, dict) else False


def _thresholds(pairs: list[_Pair], overrides: dict[str, float]) -> tuple[Thresholds, float]:
    """Defaults for the lowest precision among the export's LoRA-targeted weights, then overrides;
    and the rounding margin (overridable as `export_rounding_margin`)."""
    dtypes = {pair.export.dtype for pair in pairs if pair.module is not None}
    name = "bfloat16" if torch.bfloat16 in dtypes else "float16" if torch.float16 in dtypes else "float32"
    overrides = dict(overrides)
    margin = overrides.pop(MARGIN_NAME, ROUNDING_MARGIN)
    try:
        return Thresholds.for_dtype(name).override(overrides), margin
    except ValueError as error:
        raise BadInput(f"--threshold: {error} or {MARGIN_NAME}") from None


@contextmanager
def _one_compute_thread() -> Iterator[None]:
    """Compute on one torch thread while the reader thread reads.

    A chunk's arithmetic (~1 MB) is too small to gain from more threads, and on a machine whose
    other cores are busy, intra-op threads waiting for each other made the audit ten times slower
    (0.06 against 0.67 GB/s, measured on 2 shared cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stream(pairs: list[_Pair], factors: dict[str, LoraFactors], say: Progress) -> tuple[list[_Figures], list[_Difference]]:
    """Read every pair once: measure each LoRA module when its last rows arrive, compare the rest with the base."""
    figures: list[_Figures] = []
    differences: dict[str, _Difference] = {}
    module: _Module | None = None
    for chunk in read_chunks([[pair.export, pair.base] for pair in pairs], READ_BYTES):
        pair = pairs[chunk.group]
        merged, w0 = chunk.tensors
        if pair.module is None:
            _compare_untouched(pair.name, merged, w0, differences)
            continue
        if chunk.row_start == 0:
            say(f"comparing {pair.name}")
            module = _Module(pair.module, factors[pair.module], pair.export.shape)
        step = max(1, STEP_BYTES // max(pair.export.row_bytes, pair.base.row_bytes, 1))
        for start in range(0, chunk.row_end - chunk.row_start, step):
            rows = slice(start, start + step)
            module.add_rows(chunk.row_start + start, chunk.row_start + start + len(merged[rows]), merged[rows], w0[rows])
        if chunk.last:
            measured = module.figures()
            if measured is not None:
                figures.append(measured)
            module = None
    return figures, list(differences.values())


def _layer(figures: _Figures, limits: Thresholds, margin: float) -> ModuleResult:
    allowed = limits.override({"layer_divergence": max(limits.layer_divergence, margin * figures.rounding_floor)})
    values = (figures.effective_scale, figures.residual, figures.divergence)
    return ModuleResult(figures.module, *values, verdict=layer_verdict(*values, allowed))


def _compare_untouched(name: str, mine: torch.Tensor, theirs: torch.Tensor, differences: dict[str, _Difference]) -> None:
    """Bit-equal to the base (or to the base cast to the export's dtype); else count what differs."""
    if mine.dtype == theirs.dtype:
        # numpy compares bytes at memory speed; torch.equal was measured ten times slower here.
        if numpy.array_equal(mine.reshape(-1).view(torch.uint8).numpy(), theirs.reshape(-1).view(torch.uint8).numpy()):
            return
        expected = theirs
    else:
        expected = theirs.to(mine.dtype)
        if torch.equal(mine, expected):
            return
    found = differences.setdefault(name, _Difference(name, "differs from the base"))
    if mine.dtype.is_floating_point:
        gap = (mine.double() - expected.double()).abs().nan_to_num(nan=float("inf"))
        found.elements += int((gap > 0).sum())
        found.max_abs = max(found.max_abs, float(gap.max()))
    else:
        found.elements += int((mine != expected).sum())


def _module_order(module: str) -> tuple:
    kind = module_kind(module)
    index = layer_index(module)
    return (index if index is not None else -1, _LORA_KINDS.index(kind) if kind in _LORA_KINDS else len(_LORA_KINDS), module)


def _explain(verdict: str, scale: float | None, layers: list[ModuleResult], differences: list[_Difference], spec) -> str:
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
