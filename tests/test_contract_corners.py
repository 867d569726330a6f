"""The contract's corners no other test reaches, each on the real engine: what a phase could not
judge (a stale prefix cache the logits cannot see, or prompts that never reach the cache).
"""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import FIXTURES

pytestmark = pytest.mark.slow  # builds engines of its own (`make test-quick` leaves it out)

# A bf16 base and a LoRA with ‖ΔW‖/‖W0‖ ≈ 2e-3: in bf16 the logits cannot resolve it even behind the
# built-in prompts' long system prompt (DESIGN: signal/noise ≈ 2, the bar is 16).
SMALL_BF16 = FIXTURES / "checkpoint-500-2e-3"


@pytest.fixture(scope="module")
def small_bf16():
    from lora_doctor import Checker

    with Checker(SMALL_BF16, dtype="bfloat16") as checker:
        yield checker


def rendered(report) -> dict[str, str]:
    from rich.console import Console

    from lora_doctor.report import render_html, render_markdown, render_terminal

    console = Console(file=io.StringIO(), width=250)
    render_terminal(report, console)
    return {"terminal": console.file.getvalue(), "markdown": render_markdown(report), "html": render_html(report)}


def test_a_stale_cache_the_bf16_logits_cannot_see_is_reported_as_not_measured(small_bf16):
    from lora_doctor.report import render_json

    # A merged push without reset_prefix_cache(): the rollouts do read the old policy's KV blocks (the
    # prompts fill two blocks), but in bf16 a 2e-3 LoRA moves them by less than the run's noise.
    report = small_bf16.run("merged-no-cache-reset")
    assert report.resolution["logits_resolve"] is False
    assert report.engine["cache_exercised"] and report.engine["cache_blocks"] >= 2
    (phase,) = report.phases
    assert phase.verdict != "stale_cache"
    assert phase.decode_cache_blocks == report.engine["cache_blocks"]
    reason = phase.not_measured["stale_cache"]
    assert "cannot resolve this LoRA" in reason and "stale prefix cache" in reason
    for name, text in rendered(report).items():
        # Markdown escapes the underscore.
        assert re.search(r"stale\\?_cache not measured — the logits cannot resolve this LoRA", text), name
    assert json.loads(render_json(report))["phases"][0]["not_measured"]["stale_cache"] == reason


def test_prompts_shorter_than_a_kv_block_say_the_cache_was_not_judged(checker):
    # The session's engine on fixtures/prompts.jsonl: 13–15 tokens a prompt, under one 128-token block.
    report = checker.run("merged")
    assert report.engine["options"]["enable_prefix_caching"] and not report.engine["cache_exercised"]
    assert [phase.name for phase in report.phases] == ["full-merged", "full-merged"]
    for phase in report.phases:
        assert phase.verdict == "ok", phase.explanation
        assert phase.decode_cache_blocks == 0
        assert "128-token KV block" in phase.not_measured["stale_cache"]
