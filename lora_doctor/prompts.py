"""Prompt sets: the user's own (a few from the training set are best) or a small built-in one."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BadInput

# Short math questions in the "Question: … / Answer:" shape common to GRPO reasoning runs.
DEFAULT_PROMPTS = [
    "Question: what is 12 plus 7?\nAnswer:",
    "Question: what is 9 plus 15?\nAnswer:",
    "Question: what is 14 minus 6?\nAnswer:",
    "Question: what is 7 times 3?\nAnswer:",
]


def load_prompts(path: str | Path | None) -> list[str]:
    """Read prompts from a .jsonl file ({"prompt": ...} per line) or a text file (one per line)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"prompts file not found: {path}")
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"cannot read prompts file {path} ({error})") from None
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                prompts.append(record["prompt"] if isinstance(record, dict) else str(record))
            except (json.JSONDecodeError, KeyError):
                raise BadInput(f'{path}:{number}: expected a JSON object with a "prompt" field') from None
    else:
        prompts = [line.replace("\\n", "\n") for line in lines]
    if not prompts:
        raise BadInput(f"prompts file {path} holds no prompts")
    return prompts
