"""`lora-doctor check` end to end: real vLLM engine, real HF + PEFT reference, bundled fixture.

The default plan runs as a user runs it (a process of its own: `default_check`); the other plans
through the CLI's own `main` in this process. The JSON report is the contract.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import CHECKPOINT, run_cli, run_cli_process

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)

# The fixture's LoRA teaches this answer format; losing it is the bug report's symptom.
FORMAT = re.compile(r"<think>.*</think>\s*<answer>.*</answer>", re.DOTALL)
# Float32 on CPU: a correct sync measured ~1e-7 mean KL; the bar is 1e-4.
KL_HEALTHY = 1e-4
SCALE_TOLERANCE = 0.05
REPORT_DIRS: dict = {}
# Per-module figures (over ‖ΔW‖) read from two float32 shards against one weight: the same sums taken
# in another order differ by float32 rounding. Relative to a figure of order 1 (a scale, a divergence
# of 1 for a double count) that is within 10 epsilons (1.2e-6); the residuals themselves are float32
# noise (~6e-8), where the shards moved them by at most 7e-9: an absolute 2e-8 there, a third of the
# figure, so a residual read as 0 (or as anything but the same noise) fails. A rank's shard missing
# or doubled moves them by ~0.5.
TP_FIGURE_RELATIVE = 1.2e-6
TP_FIGURE_ABSOLUTE = 2e-8


@pytest.fixture(scope="module")
def runs(tmp_path_factory, default_check):
    """One CLI run per plan, shared by the assertions below."""
    out = tmp_path_factory.mktemp("reports")
    results = {"swift-colocate-lora": (default_check.run, default_check.report)}
    REPORT_DIRS.clear()
    REPORT_DIRS["swift-colocate-lora"] = default_check.report_dir
    for plan in ("swift-fixed", "merged"):
        path = out / f"{plan}.json"
        run = run_cli("check", CHECKPOINT, "--plan", plan, "--json", path, "--report", out / f"{plan}-report")
        results[plan] = (run, run.report(path) if path.exists() else None)
        REPORT_DIRS[plan] = out / f"{plan}-report"
    return results


def phases(report: dict) -> dict[str, list[dict]]:
    by_name: dict[str, list[dict]] = {}
    for phase in report["phases"]:
        by_name.setdefault(phase["name"], []).append(phase)
    return by_name


def test_double_count_after_resume_is_caught(runs):
    run, report = runs["swift-colocate-lora"]
    assert run.exit_code == 1, run.stderr
    assert report["verdict"] == "fail" and report["exit_code"] == 1
    assert report["plan"]["phases"] == ["full-merged", "adapter"]
    (merged,) = phases(report)["full-merged"]
    assert merged["verdict"] == "ok"
    assert merged["effective_scale"] == pytest.approx(1.0, abs=SCALE_TOLERANCE)
    (adapter,) = phases(report)["adapter"]
    assert adapter["verdict"] == "double_counted"
    assert adapter["effective_scale"] == pytest.approx(2.0, abs=SCALE_TOLERANCE)


def test_double_count_breaks_the_answer_format_in_the_samples(runs):
    _, report = runs["swift-colocate-lora"]
    merged, adapter = report["phases"]
    assert all(FORMAT.search(s["engine"]) for s in merged["samples"])
    assert all(FORMAT.search(s["reference"]) for s in adapter["samples"])
    broken = [s for s in adapter["samples"] if not FORMAT.search(s["engine"])]
    assert broken, adapter["samples"]
    assert adapter["greedy_match"] < 1.0


def test_the_terminal_report_names_the_double_count(runs):
    run, _ = runs["swift-colocate-lora"]
    assert "double_counted" in run.stdout
    assert "FAIL" in run.stdout


@pytest.mark.parametrize("plan", ["swift-fixed", "merged"])
def test_correct_sync_paths_are_healthy(runs, plan):
    run, report = runs[plan]
    assert run.exit_code == 0, run.stderr
    assert report["verdict"] == "pass"
    assert len(report["phases"]) == 2
    for phase in report["phases"]:
        assert phase["verdict"] == "ok"
        assert phase["effective_scale"] == pytest.approx(1.0, abs=SCALE_TOLERANCE)
        assert phase["kl_mean"] < KL_HEALTHY
        assert phase["top1_agreement"] == 1.0


def test_report_follows_the_schema(runs):
    _, report = runs["swift-fixed"]
    assert report["schema_version"] == 1
    assert report["tool"]["name"] == "lora-doctor"
    assert set(report["environment"]) >= {"python", "torch", "vllm", "transformers", "peft", "device"}
    assert report["checkpoint"]["r"] == 8 and report["checkpoint"]["lora_alpha"] == 16
    assert report["checkpoint"]["scaling"] == 2.0 and report["checkpoint"]["use_rslora"] is False
    assert set(report["thresholds"]) >= {"min_signal_to_noise", "noise_kl", "scale_tolerance", "part_tolerance", "layer_divergence"}
    assert set(report["resolution"]) >= {"noise_kl", "missing_kl", "doubled_kl", "signal_to_noise", "logits_resolve", "kl_limit"}
    phase = report["phases"][0]
    assert set(phase) >= {"index", "name", "verdict", "effective_scale", "kl_mean", "kl_max", "top1_agreement", "greedy_match", "layers", "samples"}
    assert phase["with_adapter"] is True


# Per-module weights read back from the engine (float32: ~1e-7 from W0 + ΔW when right).
LAYER_SCALE_TOLERANCE = 0.02
LAYER_DIVERGENCE = 1e-3


def test_every_module_is_double_counted_in_the_adapter_phase(runs):
    _, report = runs["swift-colocate-lora"]
    merged, adapter = report["phases"]
    assert len(adapter["layers"]) == 14
    for layer in adapter["layers"]:
        assert layer["effective_scale"] == pytest.approx(2.0, abs=LAYER_SCALE_TOLERANCE), layer
        assert layer["verdict"] == "double_counted"
    for layer in merged["layers"]:
        assert layer["effective_scale"] == pytest.approx(1.0, abs=LAYER_SCALE_TOLERANCE), layer
        assert layer["divergence"] < LAYER_DIVERGENCE


def test_every_module_holds_w0_plus_delta_on_the_fixed_path(runs):
    _, report = runs["swift-fixed"]
    for phase in report["phases"]:
        assert len(phase["layers"]) == 14
        for layer in phase["layers"]:
            assert layer["effective_scale"] == pytest.approx(1.0, abs=LAYER_SCALE_TOLERANCE), layer
            assert layer["divergence"] < LAYER_DIVERGENCE


def test_tensor_parallel_2_gives_the_single_worker_figures(runs, tmp_path):
    path = tmp_path / "tp2.json"
    # Tensor-parallel ranks are processes of their own, spawned from the CLI's.
    run = run_cli_process("check", CHECKPOINT, "--plan", "swift-colocate-lora", "--tensor-parallel-size", "2", "--json", path)
    assert run.exit_code == 1, run.stderr
    _, single = runs["swift-colocate-lora"]
    tp2 = run.report(path)
    # The engine says how many ranks it used: the figures below come from two shards per module.
    assert single["environment"]["tensor_parallel_size"] == 1 and tp2["environment"]["tensor_parallel_size"] == 2
    for one, two in zip(single["phases"], tp2["phases"], strict=True):
        assert two["verdict"] == one["verdict"]
        assert len(one["layers"]) > 0
        assert [layer["module"] for layer in two["layers"]] == [layer["module"] for layer in one["layers"]]
        for a, b in zip(one["layers"], two["layers"], strict=True):
            for key in ("effective_scale", "residual", "divergence"):
                assert b[key] == pytest.approx(a[key], rel=TP_FIGURE_RELATIVE, abs=TP_FIGURE_ABSOLUTE), (key, a, b)


def test_bug_report_attachments_are_written_and_re_rendered(runs, tmp_path):
    attachments = sorted(p.name for p in REPORT_DIRS["swift-colocate-lora"].iterdir())
    assert attachments == ["report.html", "report.json", "report.md"]
    saved = REPORT_DIRS["swift-colocate-lora"] / "report.json"
    assert json.loads(saved.read_text())["phases"][1]["verdict"] == "double_counted"
    for fmt, name in (("md", "report.md"), ("html", "report.html")):
        out = tmp_path / name
        rerun = run_cli("report", saved, "--format", fmt, "--output", out)
        assert rerun.exit_code == 1  # the saved report's own exit code
        assert out.read_text() == (REPORT_DIRS["swift-colocate-lora"] / name).read_text()
