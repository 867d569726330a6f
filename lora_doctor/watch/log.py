"""One JSON line per observed step (`log_file=` or LORA_DOCTOR_WATCH_LOG)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from ..report.json import finite_values

LOG_VARIABLE = "LORA_DOCTOR_WATCH_LOG"


def log_path(log_file: str | os.PathLike | None) -> Path | None:
    chosen = log_file if log_file is not None else os.environ.get(LOG_VARIABLE) or None
    return Path(chosen) if chosen is not None else None


def json_line(record) -> str:
    """The record as one line of strict JSON (a figure that is not finite is null)."""
    return json.dumps(finite_values(asdict(record)), allow_nan=False)


def append(path: Path, line: str) -> None:
    """Appended and closed at once: a run that dies keeps every step logged before it."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")

