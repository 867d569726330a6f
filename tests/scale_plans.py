"""Custom sync plans that merge the LoRA at scales away from the fit's nodes α ∈ {0, 1, 2}."""

import math


def merged_at_1_5(sync):
    """Between the nodes 1 and 2."""
    sync.load_merged(scale=1.5)
    sync.probe("merged-1.5")


def merged_at_sqrt_r(sync):
    """sqrt(r) = sqrt(8): a plain LoRA scaled as rsLoRA, past the outer node 2."""
    sync.load_merged(scale=math.sqrt(8))
    sync.probe("merged-sqrt-r")


def merged_at_3_5(sync):
    """Near the top of the searched range (1.25·sqrt(8) ≈ 3.54)."""
    sync.load_merged(scale=3.5)
    sync.probe("merged-3.5")


def merged_at_minus_half(sync):
    """ΔW subtracted at half scale: below the outer node 0."""
    sync.load_merged(scale=-0.5)
    sync.probe("merged-minus-0.5")
