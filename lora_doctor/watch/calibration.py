"""The run's own noise floor, learned on its healthy steps (no threshold from another machine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Floor:
    """The largest gap and per-token noise of the run's healthy steps so far.

    The first `calibration_steps` unflagged steps (after the start-up probe confirmed the engine) set
    it; later unflagged steps raise it: a run's gap grows slowly as its policy moves away from the
    base (bf16 rounds a larger ΔW differently), and only a jump past it is news. A flagged step never
    feeds it, even when its probe reads ok: the probe's resolution is bf16's (a KV block one step
    stale can pass it), and a floor that took the jump would hide the break from every later step.
    """

    calibration_steps: int
    gap_mean: float = 0.0
    noise_rms: float = 0.0
    steps: int = 0

    @property
    def calibrated(self) -> bool:
        return self.steps >= self.calibration_steps

    def learn(self, gap_mean: float, noise_rms: float) -> None:
        self.gap_mean = max(self.gap_mean, gap_mean)
        self.noise_rms = max(self.noise_rms, noise_rms)
        self.steps += 1
