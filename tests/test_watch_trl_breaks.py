"""lora-doctor watch in a real TRL 1.16 GRPO run, broken from step 4: the push skipped (the engine keeps
step 3's policy), and the push without `reset_prefix_cache()` on prompts behind a shared system prompt
longer than a KV block. See test_watch_trl.py for the healthy run and the double count."""

from __future__ import annotations

import pytest
from trl_watch_runs import BREAK_STEP, STEPS, by_step, watched_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def assert_calm_until_the_break(records: dict) -> None:
    for step in range(1, BREAK_STEP):
        assert not records[step]["flagged"], records[step]["reason"]
    assert records[1]["probe_verdict"] == "ok"


def test_a_skipped_push_is_flagged_and_not_a_scale(tmp_path):
    done, data = watched_run(tmp_path, "skipped", "--keep-going")
    assert done.returncode == 1, done.stderr[-3000:]
    records = by_step(data)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert_calm_until_the_break(records)
    broken = records[BREAK_STEP]
    assert broken["flagged"] and "jumped past" in broken["reason"]
    # The engine holds the policy of a step before: no scale of the LoRA explains its difference.
    assert broken["not_a_scale"] and broken["scale_explains"] < 0.5, broken
    assert broken["probe_verdict"] not in (None, "ok"), broken
    assert all(records[step]["flagged"] for step in range(BREAK_STEP, STEPS + 1))


def test_a_push_without_cache_reset_is_flagged_and_named_stale_cache(tmp_path):
    done, data = watched_run(tmp_path, "stale_cache", "--keep-going")
    assert done.returncode == 1, done.stderr[-3000:]
    records = by_step(data)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert_calm_until_the_break(records)
    broken = records[BREAK_STEP]
    assert broken["flagged"] and broken["not_a_scale"], broken
    assert broken["probe_verdict"] == "stale_cache", broken["reason"]
    # The escalation probed the step's own prompts, whose shared system prompt fills a KV block.
    probe = data["probes"][str(BREAK_STEP)]
    assert probe["decode_cache_blocks"] >= 1 and probe["decode_kl_no_cache"] <= probe["kl_limit"] < probe["decode_kl_mean"]


def test_a_new_lora_is_not_measurable_yet_and_its_base_comes_free_with_beta(tmp_path):
    """A LoRA TRL makes from `peft_config` (B = 0) with beta > 0: TRL's reference is the base, which the
    watch takes instead of a forward of its own; at step 1 the policy is the base and α̂ is not measurable."""
    done, data = watched_run(tmp_path, "healthy", "--fresh-adapter", "--beta", "0.04", "--steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    records = by_step(data)
    assert sorted(records) == [1, 2, 3]
    assert records[1]["alpha_hat"] is None and "not measurable yet" in records[1]["reason"]
    for record in records.values():
        assert not record["flagged"], record["reason"]
        if record["alpha_hat"] is not None:
            assert abs(record["alpha_hat"] - 1.0) <= record["alpha_hat_uncertainty"], record
