"""One LoRA module of a merged export: the sums its row chunks add up to, and the figures they give.

Per module the export's weight W_m is compared with what a correct merge in the export's dtype holds,
E = merge_in_dtype(W0, ΔW, dtype), which keeps only the part D = E − W0 of ΔW that the dtype can
represent (the check's per-module figures, measured against that kept part; identical in float32):

    effective_scale = <W_m − W0, ΔW> / <D, ΔW>          1 merged once, 2 twice, 0 not merged
    residual        = ‖W_m − W0 − effective_scale·D‖ / ‖D‖   what no multiple of the merge explains
    divergence      = ‖W_m − E‖ / ‖D‖
    rounding        = eps·‖W0‖ / ‖D‖    one ulp of every element of the export's dtype, over ‖D‖

`rounding` is the check's unit (`measure/layer_figures.py`, over ‖ΔW‖ there): two correct roundings of
the same merge differ by at most that, so the audit's limits grow by `Thresholds.rounding_margin` of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapter.lora_delta import LoraFactors, merge_in_dtype
from ..errors import BadInput
from .bf16_sums import bf16_sums


@dataclass(frozen=True)
class ModuleFigures:
    """One module's measurements; every norm is relative to ‖D‖ (the part of ΔW the export can hold)."""

    module: str
    e_delta: float  # <W_m − E, ΔW>
    kept_delta: float  # <D, ΔW>
    effective_scale: float
    residual: float
    divergence: float
    rounding_floor: float  # ‖E − (W0 + ΔW)‖ / ‖D‖: what this merge's own rounding moved
    rounding: float  # eps·‖W0‖ / ‖D‖
    merge: str = "in the export's dtype"  # which correct merge the export is judged against


# A bf16 export of a float32 base is correct in two ways: PEFT's merge of the base loaded in bf16
# (every part rounded: `merge_in_dtype`) or a merge in float32 saved in bf16 (rounded once). With
# ‖ΔW‖/‖W0‖ ≈ 2e-3 most of ΔW is below bf16's half ulp and the two keep different parts of it: judged
# against the other, a correct export measured α 1.23. Both are measured; the closer one is used.
MERGED_IN_BF16 = "in bf16 (PEFT's merge of a bf16 base)"
MERGED_IN_FLOAT32 = "in float32, saved in bf16"


class ModuleSums:
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
        self.base_squares = 0.0  # ‖W0‖²
        self.eps = 0.0  # of the export's dtype
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
        self.eps = torch.finfo(merged.dtype).eps
        if merged.dtype == torch.bfloat16 and w0.dtype in (torch.bfloat16, torch.float32):
            *sums, base_squares = bf16_sums(merged, w0, delta)
            self.gram += gram_of(sums)
            self.base_squares += base_squares
            if w0.dtype == torch.float32:
                if self.gram_once is None:
                    self.gram_once = torch.zeros(3, 3, dtype=torch.float64)
                self.gram_once += gram_of(bf16_sums(merged, w0, delta, once=True)[:6])
            return
        self.base_squares += float(torch.linalg.vector_norm(w0, dtype=torch.float64)) ** 2
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

    def figures(self) -> ModuleFigures | None:
        if self.gram_once is None:
            return self._figures(self.gram)
        measured = [f for f in (self._figures(self.gram, MERGED_IN_BF16), self._figures(self.gram_once, MERGED_IN_FLOAT32)) if f]
        return min(measured, key=lambda f: f.divergence, default=None)

    def _figures(self, gram: torch.Tensor, merge: str = ModuleFigures.merge) -> ModuleFigures | None:
        (ee, eD, eX), (_, DD, DX), (_, _, XX) = gram.tolist()
        if DX <= 0 or DD <= 0:
            return None  # the export's dtype rounds all of ΔW away: nothing to measure
        shift = eX / DX  # effective_scale − 1
        return ModuleFigures(
            module=self.name,
            e_delta=eX,
            kept_delta=DX,
            effective_scale=1.0 + shift,
            residual=math.sqrt(max(ee - 2 * shift * eD + shift * shift * DD, 0.0) / DD),
            divergence=math.sqrt(ee / DD),
            rounding_floor=math.sqrt(max(DD - 2 * DX + XX, 0.0) / DD),
            rounding=self.eps * math.sqrt(self.base_squares / DD),
            merge=merge,
        )


def gram_of(sums: tuple[float, ...]) -> torch.Tensor:
    """The 3×3 Gram matrix of (e, D, ΔW) from the first six sums of `bf16_sums`."""
    ee, eD, eX, DD, DX, XX = sums
    return torch.tensor([[ee, eD, eX], [eD, DD, DX], [eX, DX, XX]], dtype=torch.float64)
