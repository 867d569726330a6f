"""Where users train: a bf16 base and LoRAs small next to the weights (‖ΔW‖/‖W0‖ ≈ 1e-2 and 2e-3),
every built-in plan with a known truth, checked in float32 and bf16 on the real engine.

The matrix is `bench/verdict_matrix.py`'s: the same runs print the table there."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT, adapter_modules, layer_modules, user_engine

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)

sys.path.insert(0, str(ROOT / "bench"))
import verdict_matrix as matrix  # noqa: E402

# Where the arithmetic is exact (a bf16 base on disk, merges computed as the trainer does, the
# adapter slot in the engine's dtype), each part reads 0 or 1 to ~2e-4; the bar is ±0.02.
PART_TOLERANCE = 0.02
CASES = [(plan, dtype, size) for dtype in matrix.DTYPES for size in matrix.SIZES for plan in matrix.TRUTH]


@pytest.fixture(scope="module")
def results():
    return matrix.run_matrix(in_process=True)


@pytest.fixture(scope="module")
def table(results):
    return {(row["plan"], row["dtype"], row["size"]): row for row in matrix.rows(results)}


@pytest.mark.parametrize(("plan", "dtype", "size"), CASES)
def test_every_phase_gets_its_true_verdict(table, plan, dtype, size):
    row = table[(plan, dtype, size)]
    assert row["verdicts"] == matrix.TRUTH[plan][dtype], row


@pytest.mark.parametrize(("plan", "dtype", "size"), CASES)
def test_every_module_holds_both_parts_the_sync_put_there(results, plan, dtype, size):
    report = results[(dtype, size)][plan]
    for phase, expected in zip(report["phases"], matrix.PARTS[plan][dtype], strict=True):
        assert len(phase["layers"]) == 14 and phase["modules_not_read"] == []
        if expected is None:
            continue
        base, slot = expected
        for layer in phase["layers"]:
            assert layer["base_part"] == pytest.approx(base, abs=PART_TOLERANCE), (phase["name"], layer)
            assert layer["slot_part"] == pytest.approx(slot, abs=PART_TOLERANCE), (phase["name"], layer)


def test_bf16_logits_cannot_resolve_a_2e_3_lora_and_say_so(results):
    for plan, report in results[("bfloat16", "2e-3")].items():
        assert report["resolution"]["logits_resolve"] is False
        for phase in report["phases"]:
            assert phase["decided_by"] == "modules", plan
            assert "cannot resolve this LoRA at this precision" in phase["explanation"]


def test_bf16_logits_resolve_a_1e_2_lora_on_a_long_prompt(results):
    # The matrix's third prompt sits behind the built-in 142-token system prompt: it carries most of
    # the signal (signal/noise 44 measured, against 2.0 on the two short prompts alone).
    for plan, report in results[("bfloat16", "1e-2")].items():
        assert report["resolution"]["logits_resolve"] is True, plan
        for phase in report["phases"]:
            assert phase["decided_by"] == "logits and modules", plan


@pytest.mark.parametrize("size", matrix.SIZES)
def test_float32_logits_resolve_and_agree_with_the_modules(results, size):
    report = results[("float32", size)]["swift-colocate-lora"]
    assert report["resolution"]["logits_resolve"] is True
    merged, adapter = report["phases"]
    assert merged["decided_by"] == adapter["decided_by"] == "logits and modules"
    assert merged["kl_mean"] < report["resolution"]["kl_limit"] < adapter["kl_mean"]
    assert adapter["effective_scale"] == pytest.approx(2.0, abs=0.05)


def test_a_bf16_merge_at_2e_3_keeps_a_measured_part_of_delta_and_warns(results):
    merged = results[("bfloat16", "2e-3")]["merged"]["phases"][0]
    kept = [layer["merge_kept"] for layer in merged["layers"]]
    # DESIGN: a bf16 merge keeps 70–79% of ΔW at 2e-3 on the first layer's modules, more on the second.
    assert 0.65 < min(kept) < 0.8 and max(kept) < 1.0
    assert merged["warnings"] and "of ΔW" in merged["warnings"][0]
    # At 1e-2 the same merge keeps > 99%: no warning. In float32 a merge keeps ΔW whole.
    assert results[("bfloat16", "1e-2")]["merged"]["phases"][0]["warnings"] == []
    for size in matrix.SIZES:
        phase = results[("float32", size)]["merged"]["phases"][0]
        assert phase["warnings"] == [] and phase["merge_kept"] == pytest.approx(1.0, abs=1e-6)


def test_the_printed_table_marks_every_row_as_expected(table):
    text = matrix.markdown(list(table.values()))
    assert text.count("| ✓ ") == len(CASES) and "✗" not in text


@pytest.fixture(scope="session")
def bf16_llm():
    """A user's bf16 engine on the bf16 base, with lora-doctor's worker extension."""
    return user_engine(matrix.FIXTURES / "tiny-qwen2-bf16", "bfloat16")


def test_probe_judges_a_float32_policy_on_a_bf16_engine_by_the_engines_precision(bf16_llm):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    from lora_doctor import probe
    from lora_doctor.adapter.lora_delta import load_lora_factors, merge_in_dtype

    base_dir = matrix.FIXTURES / "tiny-qwen2-bf16"
    adapter = matrix.FIXTURES / "checkpoint-500-2e-3"
    # The trainer's policy in float32: were thresholds taken from it, the logits would claim to resolve
    # a LoRA that the bf16 engine's own noise hides.
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(adapter))
    w0 = load_file(str(base_dir / "model.safetensors"))
    factors = load_lora_factors(adapter)
    merged = {name: merge_in_dtype(w, factors[name[: -len(".weight")]].delta(), torch.bfloat16) if name[: -len(".weight")] in factors else w
              for name, w in w0.items()}

    # ms-swift #8233 by hand: a bf16 merge pushed as the base, then the adapter on top.
    bf16_llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(merged.items())})
    request = LoRARequest("policy-1", 1, str(adapter))
    doubled = probe(bf16_llm, policy, lora_request=request, prompts=matrix.PROMPTS, base_dir=base_dir)
    assert doubled.verdict == "double_counted", doubled.explanation
    assert doubled.decided_by == "modules" and "cannot resolve this LoRA" in doubled.explanation
    assert layer_modules(doubled.layers) == adapter_modules(adapter)
    assert all(layer.base_part == pytest.approx(1, abs=PART_TOLERANCE) and layer.slot_part == pytest.approx(1, abs=PART_TOLERANCE)
               for layer in doubled.layers)
    # Without the per-module read nothing can decide: unresolved, never ok.
    blind = probe(bf16_llm, policy, lora_request=request, prompts=matrix.PROMPTS, base_dir=base_dir, module_read=False)
    assert blind.verdict == "unresolved" and blind.decided_by == "nothing"

    # A correct adapter sync onto the untouched base.
    bf16_llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(w0.items())})
    right = probe(bf16_llm, policy, lora_request=LoRARequest("policy-2", 2, str(adapter)), prompts=matrix.PROMPTS, base_dir=base_dir)
    assert right.verdict == "ok", right.explanation


def test_reports_say_what_the_logits_cannot_see_and_show_both_parts(results):
    from rich.console import Console

    from lora_doctor.report import render_terminal
    from lora_doctor.report.html import render_html
    from lora_doctor.report.markdown import render_markdown
    from lora_doctor.result import Report

    report = Report.from_dict(results[("bfloat16", "2e-3")]["swift-colocate-lora"])
    merged, adapter = report.phases
    console = Console(record=True, width=200)
    render_terminal(report, console)
    for text in (render_markdown(report), console.export_text()):
        assert "the logits cannot resolve this LoRA at this precision" in text
        assert f"({merged.effective_scale:.3f})" in text  # the fitted α is marked as noise
        assert "base 1.000–1.000, slot 1.000–1.000" in text  # the double count's structure
        assert f"keep {merged.merge_kept:.0%} of ΔW" in text
    html = render_html(report)
    assert "the logits cannot resolve this LoRA" in html and "<th class=num>base</th><th class=num>slot</th>" in html



def test_a_merge_rounded_in_another_order_is_still_a_merge(tmp_path):
    from conftest import run_cli

    # The float32 base on disk: in a bf16 engine the two merge orders differ in many elements.
    path = tmp_path / "r.json"
    run = run_cli(
        "check", matrix.FIXTURES / "checkpoint-500-2e-3", "--base", matrix.FIXTURES / "tiny-qwen2", "--dtype", "bfloat16",
        "--plan", f"{ROOT / 'tests' / 'custom_plans.py'}:float32_master_merge", "--max-new-tokens", "8", "--json", path,
    )
    assert run.exit_code == 1, run.stderr[-3000:]
    merged, doubled = run.report(path)["phases"]
    assert (merged["verdict"], doubled["verdict"]) == ("ok", "double_counted"), (merged["explanation"], doubled["explanation"])
    # Not PEFT's bf16 merge element for element, but within an ulp of it everywhere.
    assert max(abs(1 - layer["base_part"]) for layer in merged["layers"]) > PART_TOLERANCE
    assert layer_modules(merged["layers"]) == adapter_modules(matrix.FIXTURES / "checkpoint-500-2e-3")
    assert all(0 < layer["base_residual"] < layer["rounding"] for layer in merged["layers"])
