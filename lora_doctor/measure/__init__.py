"""From two forwards to a verdict: the reference (transformers + PEFT), the streamed logit pass and
its metrics, the run's noise, the per-module figures, the verdicts and their thresholds, and the phase
measurer that `check` and `probe` share (`phase.PhaseMeasurer`).
"""
