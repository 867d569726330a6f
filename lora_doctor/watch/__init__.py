"""lora-doctor watch: every step of a run checked from the log-probs the trainer already computed."""

from .watch import Watch, WatchStep, figures

__all__ = ["Watch", "WatchStep", "figures"]
