"""Prompt sets given in Python or in a file: what cannot be measured is bad input (exit 2), never a crash."""

from __future__ import annotations

import json

import pytest

from lora_doctor.errors import BadInput
from lora_doctor.measure.prompts import DEFAULT_PROMPTS, load_prompts


@pytest.mark.parametrize(
    ("prompts", "message"),
    [([], "holds no prompts"), ([5], "prompt 1 is int 5, not text"), (["ok", ""], "prompt 2 is empty"), (["  \n"], "prompt 1 is empty")],
)
def test_a_prompt_list_that_cannot_be_measured_is_bad_input(prompts, message):
    with pytest.raises(BadInput, match=message):
        load_prompts(prompts)


def test_a_jsonl_prompt_that_is_not_text_is_bad_input(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": 5}) + "\n")
    with pytest.raises(BadInput, match="prompt 2 is int 5, not text"):
        load_prompts(path)


def test_lists_files_and_the_default_set_are_returned_as_given(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\\nline\n\ntwo\n")
    assert load_prompts(path) == ["one\nline", "two"]
    assert load_prompts(["a", "b"]) == ["a", "b"]
    assert load_prompts(None) == DEFAULT_PROMPTS
