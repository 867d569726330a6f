"""Every known sync failure, reproduced by a plan on the real engine, gets its name."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CHECKPOINT, LLAMA_RSLORA, ROOT, adapter_modules, layer_modules, run_cli

from lora_doctor.errors import BadInput
from lora_doctor.plans.builtin import PLANS, get_plan

# Fitted scales are exact to ~1e-3 in float32 when a scale explains the engine; the issue asks ±0.05.
SCALE_TOLERANCE = 0.05


def run(checker, name):
    return checker.run(get_plan(name))


@pytest.mark.parametrize(
    ("plan", "phases"),
    [("swift-fixed", ["full-base", "adapter"]), ("merged", ["full-merged", "full-merged"]), ("verl-adapter", ["adapter", "adapter"])],
)
def test_correct_sync_paths_are_ok(checker, plan, phases):
    report = run(checker, plan)
    # A report without phases would pass every check below (and the overall verdict).
    assert [p.name for p in report.phases] == phases
    assert report.verdict == "pass", [(p.name, p.verdict, p.explanation) for p in report.phases]
    for phase in report.phases:
        assert phase.effective_scale == pytest.approx(1.0, abs=SCALE_TOLERANCE)


def test_swift_colocate_lora_is_double_counted(checker):
    merged, adapter = run(checker, "swift-colocate-lora").phases
    assert merged.verdict == "ok"
    assert adapter.verdict == "double_counted"
    assert adapter.effective_scale == pytest.approx(2.0, abs=SCALE_TOLERANCE)


def test_sleep_mode_reload_loses_the_lora(checker):
    merged, woken = run(checker, "trl-sleep-reload").phases
    assert merged.verdict == "ok"
    assert woken.verdict == "missing"
    assert woken.effective_scale == pytest.approx(0.0, abs=SCALE_TOLERANCE)
    assert layer_modules(woken.layers) == adapter_modules(CHECKPOINT)
    assert all(layer.verdict == "missing" for layer in woken.layers)


def test_reused_adapter_id_serves_the_stale_adapter(checker):
    (phase,) = run(checker, "adapter-reused-id").phases
    assert phase.verdict == "stale", phase.explanation
    assert phase.kl_previous is not None and phase.kl_previous < 1e-4
    assert phase.kl_mean > 1e-3
    assert layer_modules(phase.layers) == adapter_modules(CHECKPOINT)
    assert all(layer.verdict == "stale" for layer in phase.layers)


def test_load_inplace_replaces_a_reused_id(checker):
    (phase,) = checker.run(get_plan(f"{ROOT / 'tests' / 'custom_plans.py'}:previous_then_current_inplace")).phases
    assert phase.verdict == "ok", phase.explanation


def test_bf16_merge_unmerge_drift_is_diverged(checker):
    (phase,) = run(checker, "merged-bf16-drift").phases
    assert phase.verdict == "diverged"
    assert layer_modules(phase.layers) == adapter_modules(CHECKPOINT)
    for layer in phase.layers:
        assert layer.effective_scale == pytest.approx(1.0, abs=SCALE_TOLERANCE)
        assert layer.verdict == "diverged"


def test_custom_plan_file_with_scale_and_hint(checker):
    (phase,) = checker.run(get_plan(f"{ROOT / 'tests' / 'custom_plans.py'}:half_scale_merge")).phases
    assert phase.verdict == "scaled"
    assert phase.effective_scale == pytest.approx(0.5, abs=SCALE_TOLERANCE)
    assert "scaling (2) was dropped" in phase.explanation


def test_custom_plan_with_layers_and_dropped_adapter(checker):
    healthy, broken = checker.run(get_plan(f"{ROOT / 'tests' / 'custom_plans.py'}:layer0_merged_without_adapter")).phases
    assert healthy.verdict == "ok"
    assert broken.verdict == "partial"
    assert layer_modules(broken.layers) == adapter_modules(CHECKPOINT)
    missing = {layer.module for layer in broken.layers if layer.verdict == "missing"}
    # Both sets empty (no module read) would compare equal: layer 1 has LoRA modules to miss.
    assert missing and missing == {layer.module for layer in broken.layers if ".layers.1." in layer.module}


def test_readme_custom_plan_example_runs(checker):
    example = ROOT / "examples" / "custom_plan.py"
    assert example.read_text().split('"""', 2)[2].strip() in (ROOT / "README.md").read_text()
    report = checker.run(get_plan(f"{example}:inplace_adapter_sync"))
    assert [p.name for p in report.phases] == ["step-1", "step-2"]
    assert report.verdict == "pass"


def test_rslora_adapter_scaled_as_plain_lora_on_a_llama_base(tmp_path):
    path = tmp_path / "r.json"
    # The built-in prompts: from the α = 0 node, on the range's edge, the fit steps inwards to 0.25.
    result = run_cli("check", LLAMA_RSLORA, "--plan", "rslora-ignored", "--json", path)
    assert result.exit_code == 1, result.stderr
    (phase,) = result.report(path)["phases"]
    assert phase["verdict"] == "scaled"
    assert phase["effective_scale"] == pytest.approx(0.25, abs=SCALE_TOLERANCE)  # 1/sqrt(16)
    assert "rsLoRA adapter scaled as plain LoRA" in phase["explanation"]


def test_plans_command_lists_every_plan():
    result = run_cli("plans")
    assert result.exit_code == 0
    for name in PLANS:
        assert name in result.stdout


def test_a_plan_that_needs_the_previous_adapter_says_so(tmp_path):
    from conftest import CHECKPOINT

    result = run_cli("check", CHECKPOINT, "--plan", "adapter-reused-id", "--json", tmp_path / "r.json")
    assert result.exit_code == 2
    assert "--previous" in result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("tests/custom_plans.py:no_such_function", "has no function"),
        ("tests/no_such_file.py:plan", "no such file"),
        ("no_such_module_anywhere:plan", "cannot load"),
    ],
)
def test_bad_custom_plan_specs_are_bad_input(spec, needle):
    with pytest.raises(BadInput, match=needle):
        get_plan(str(Path(ROOT, spec)) if spec.startswith("tests/") else spec)
