"""Pre-flight inspection of a LoRA checkpoint, no engine needed.

Takes the opened checkpoint (adapter/checkpoint.py: its config, its adapter file's tensor headers and
its base's config and weight headers, each read once there) and lists what an inference engine (vLLM
in particular, see `engine.serving` for the facts read in its sources) refuses, drops or computes
differently from the trainer's PEFT model. No vLLM import, no printing, no file opened here.

`findings` holds what it reports; `inspect` runs every check; the checks are cut by what they ask:
`refusals` (what vLLM refuses to load or serve), `fit` (the base's weights and the engine's names),
`values` (NaN/Inf, an untrained LoRA, dtypes), `scaling` (patterns, rsLoRA, fan_in_fan_out).
"""

from .findings import ADAPTER_REFUSED, SCHEMA_VERSION, SEVERITIES, Finding, PreflightReport
from .inspect import inspect_checkpoint

__all__ = ["ADAPTER_REFUSED", "SCHEMA_VERSION", "SEVERITIES", "Finding", "PreflightReport", "inspect_checkpoint"]
