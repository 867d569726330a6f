"""What the logits can tell at this run's precision: the noise where engine and reference must
agree, the signal a whole-LoRA failure makes, and the KL limit that follows from the two."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .verdict import Thresholds

# KLs below this are the float32 rounding of the log-probs themselves (summed in float64): a noise
# measured below it is taken at it, so a ratio never divides by zero.
KL_FLOOR = 1e-12

MEASURED = "measured"  # engine vs reference on the engine's untouched base, right after start
PRIOR = "dtype prior"  # Thresholds.noise_kl of the engine's dtype (the engine's state is not known)


@dataclass(frozen=True)
class Resolution:
    """Noise and signal of one run, in the direction of `kl_mean` (reference ‖ engine)."""

    noise_kl: float
    # KL(reference at α = 1 ‖ reference at α = 0) and (‖ α = 2): what a missing or a doubled LoRA does.
    missing_kl: float
    doubled_kl: float
    min_signal_to_noise: float
    noise_source: str = MEASURED

    @property
    def signal_kl(self) -> float:
        """The smallest whole-LoRA failure the logits must see."""
        return min(self.missing_kl, self.doubled_kl)

    @property
    def signal_to_noise(self) -> float:
        return self.signal_kl / max(self.noise_kl, KL_FLOOR)

    @property
    def resolves(self) -> bool:
        return self.signal_to_noise >= self.min_signal_to_noise

    @property
    def kl_limit(self) -> float:
        """The mean KL above which a phase is not healthy: the geometric mean of noise and signal,
        equally far (in log scale) from what a right and a wrong engine measure."""
        return math.sqrt(max(self.noise_kl, KL_FLOOR) * self.signal_kl)

    @property
    def scale_resolution(self) -> float:
        """How far off α the noise alone can move a fit (KL grows as (α − 1)²·signal)."""
        return math.sqrt(max(self.noise_kl, KL_FLOOR) / max(self.signal_kl, KL_FLOOR))

    def as_dict(self) -> dict:
        return {
            "noise_kl": self.noise_kl,
            "noise_source": self.noise_source,
            "missing_kl": self.missing_kl,
            "doubled_kl": self.doubled_kl,
            "signal_to_noise": self.signal_to_noise,
            "min_signal_to_noise": self.min_signal_to_noise,
            "logits_resolve": self.resolves,
            "kl_limit": self.kl_limit,
        }


def measure_resolution(reference_kl: dict[float, float], thresholds: Thresholds, noise_kl: float | None = None) -> Resolution:
    """Signal from a logit pass's `reference_kl` (KL(reference at α = 1 ‖ at α = 0 and α = 2));
    noise from `noise_kl`, the engine on its untouched base without an adapter against the reference
    at α = 0 (they must agree), or the dtype's prior when the engine's state is not known."""
    noise, source = (noise_kl, MEASURED) if noise_kl is not None else (thresholds.noise_kl, PRIOR)
    return Resolution(
        noise_kl=noise,
        missing_kl=reference_kl[0.0],
        doubled_kl=reference_kl[2.0],
        min_signal_to_noise=thresholds.min_signal_to_noise,
        noise_source=source,
    )
