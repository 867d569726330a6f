"""The options' defaults: one home, read by the `lora-doctor` command and by the library (`check`, `gate`,
`Checker`, `probe`, the trainer callback) alike, so that a script and the command run the same check.

Import-light (the command reads it before anything heavy loads)."""

from __future__ import annotations

from .engine.deadline import DEFAULT_ENGINE_TIMEOUT

# ms-swift 3.10.0–4.0.1's colocate LoRA after resume (#8233): the bug lora-doctor was built to catch.
PLAN = "swift-colocate-lora"
# None: what the trainer's engine computes in (the base's own dtype; see `engine.platform.default_dtype`).
DTYPE: str | None = None
# None: the built-in math questions (`measure/prompts.py`).
PROMPTS = None
# Greedy tokens compared per prompt in a check: enough for a lost format tag to show in the samples.
MAX_NEW_TOKENS = 32
# A probe runs inside a trainer's step: half a check's continuation keeps it short.
PROBE_MAX_NEW_TOKENS = 16
TENSOR_PARALLEL_SIZE = 1
# None: sized by the engine driver (on the CPU build VLLM_CPU_KVCACHE_SPACE if set, else 1 GiB; on
# CUDA twice what the prompts need).
KV_CACHE_GIB: int | None = None
# The GPU when the reference fits there beside the engine, else the CPU.
REFERENCE_DEVICE = "auto"
# Read what the engine holds per module: the evidence that decides where the logits cannot.
MODULE_READ = True
# The longest an engine may make no progress on lora-doctor's requests (the reason for the value is
# beside it, in `engine/deadline.py`).
ENGINE_TIMEOUT = DEFAULT_ENGINE_TIMEOUT
# The trainer callback: probe at every step's end unless told the sync cadence, and stop a run whose
# engine computes another policy.
EVERY_N_STEPS = 1
STOP_ON_FAILURE = True
