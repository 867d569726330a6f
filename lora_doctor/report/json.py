"""The machine contract: the JSON report (schema_version 1)."""

from __future__ import annotations

import json
import math

from ..result import Report


def render_json(report: Report) -> str:
    return json.dumps(_finite(report.to_dict()), indent=2, ensure_ascii=False) + "\n"


def _finite(value):
    """NaN and ±Inf (a non-finite phase's figures) as null: JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
