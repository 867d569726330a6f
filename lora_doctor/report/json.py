"""The machine contract: the JSON report (schema_version 1)."""

from __future__ import annotations

import json
import math

from ..result import Report


def render_json(report: Report) -> str:
    return json.dumps(finite_values(report.to_dict()), indent=2, ensure_ascii=False) + "\n"


def finite_values(value):
    """NaN and ±Inf (a non-finite phase's figures) as null: JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_values(item) for item in value]
    return value
