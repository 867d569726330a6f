"""`lora-doctor audit`: merged exports built by the fixture script, audited through the real CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import BASE, CHECKPOINT, LLAMA_RSLORA, ROOT, adapter_modules, layer_modules, run_cli
from processes import run_process

sys.path.insert(0, str(ROOT / "fixtures"))
import build_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Every export, built once for the module by the fixture script (real PEFT merges)."""
    out = tmp_path_factory.mktemp("exports")
    real_size = build_fixtures.real_size_adapter(out / "adapter-real-size", ratio=1e-2)
    small = build_fixtures.real_size_adapter(out / "adapter-2e-3", ratio=2e-3)
    return {
        "correct": build_fixtures.export_merged(out / "correct"),
        "merged-twice": build_fixtures.export_merged_twice(out / "merged-twice"),
        "not-merged": build_fixtures.export_unmerged(out / "not-merged"),
        "layer-1-only": build_fixtures.export_one_layer(out / "layer-1-only", layer=1),
        "sharded": build_fixtures.export_merged(out / "sharded", max_shard_size="400KB"),
        "rslora-unscaled": build_fixtures.export_rslora_unscaled(out / "rslora-unscaled"),
        "real-size-adapter": real_size,
        "bf16": build_fixtures.export_merged(out / "bf16", ckpt_dir=real_size, dtype=torch.bfloat16),
        "bf16-merged-twice": build_fixtures.export_merged_twice(out / "bf16-twice", ckpt_dir=real_size, dtype=torch.bfloat16),
        "small-adapter": small,
        "bf16-of-float32-merge": build_fixtures.export_merged_in_float32(out / "bf16-of-float32", ckpt_dir=small),
        "bf16-of-float32-merge-twice": build_fixtures.export_merged_in_float32(out / "bf16-of-float32-twice", ckpt_dir=small, times=2),
        "real-size-bf16-of-float32-merge-twice": build_fixtures.export_merged_in_float32(
            out / "real-size-bf16-of-float32-twice", ckpt_dir=real_size, times=2
        ),
    }


def audit(export: Path, adapter: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    report = tmp_path / "audit.json"
    run = run_cli("audit", export, "--adapter", adapter, "--json", report, *extra)
    assert run.exit_code in (0, 1), run.stderr
    return run.exit_code, json.loads(report.read_text())


def only_phase(report: dict) -> dict:
    assert [p["name"] for p in report["phases"]] == ["export"]
    return report["phases"][0]


def test_correct_export_is_ok(exports, tmp_path):
    code, report = audit(exports["correct"], CHECKPOINT, tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"], report["verdict"]) == (0, "ok", "pass")
    assert phase["effective_scale"] == pytest.approx(1.0, abs=1e-5)
    assert len(phase["layers"]) == 14
    assert max(layer["divergence"] for layer in phase["layers"]) < 1e-5
    export = report["checkpoint"]["export"]
    assert export["differing_untouched"] == 0 and export["untouched_tensors"] == 26 - 14
    assert phase["kl_mean"] is None  # no engine, no logits


def test_export_merged_twice_is_double_counted(exports, tmp_path):
    code, report = audit(exports["merged-twice"], CHECKPOINT, tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (1, "double_counted")
    assert layer_modules(phase["layers"]) == adapter_modules(CHECKPOINT)
    assert all(layer["effective_scale"] == pytest.approx(2.0, abs=1e-4) for layer in phase["layers"])
    # Exactly a multiple of ΔW: the sums must not cancel into a residual that would read as `diverged`.
    assert max(layer["residual"] for layer in phase["layers"]) < 1e-5


def test_export_identical_to_the_base_is_missing(exports, tmp_path):
    code, report = audit(exports["not-merged"], CHECKPOINT, tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (1, "missing")
    assert layer_modules(phase["layers"]) == adapter_modules(CHECKPOINT)
    assert all(layer["effective_scale"] == 0.0 for layer in phase["layers"])


def test_one_layer_merged_is_partial_and_names_the_other_layer(exports, tmp_path):
    code, report = audit(exports["layer-1-only"], CHECKPOINT, tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (1, "partial")
    wrong = {layer["module"] for layer in phase["layers"] if layer["verdict"] != "ok"}
    assert wrong and all(".layers.0." in module for module in wrong) and len(wrong) == 7
    assert "missing in 7/14 modules: layer 0" in phase["explanation"]


def test_sharded_export_is_ok(exports, tmp_path):
    assert (exports["sharded"] / "model.safetensors.index.json").is_file()
    code, report = audit(exports["sharded"], CHECKPOINT, tmp_path)
    assert (code, only_phase(report)["verdict"]) == (0, "ok")
    assert report["checkpoint"]["export"]["files"] > 1


def test_rslora_merged_without_its_scaling_is_scaled_by_one_over_sqrt_r(exports, tmp_path):
    code, report = audit(exports["rslora-unscaled"], LLAMA_RSLORA, tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (1, "scaled")
    assert phase["effective_scale"] == pytest.approx(0.25, abs=1e-3)  # r = 16
    assert "1/sqrt(r)" in phase["explanation"]
    # The hand-written export also wrote the tied lm_head: it is the base's embedding, not a difference.
    assert report["checkpoint"]["export"]["differing_untouched"] == 0


def test_bf16_export_of_a_real_size_lora_is_ok(exports, tmp_path):
    code, report = audit(exports["bf16"], exports["real-size-adapter"], tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (0, "ok")
    assert report["checkpoint"]["export"]["dtypes"] == ["bfloat16"]
    # bf16 rounds a visible part of a real-size ΔW: the rounding floor is what lets this pass.
    assert report["checkpoint"]["export"]["max_rounding_floor"] > 0.05
    assert report["thresholds"]["layer_divergence"] == 2e-2


def test_the_rounding_margin_is_the_checks_own_threshold(exports, tmp_path):
    # The audit's thresholds are a check's, by the same names: its rounding margin counts ulps of every
    # element (`rounding`, over the kept ΔW), as a check's does. Without it, bf16's rounding of a correct
    # export (residual 0.026–0.033 of ‖D‖ here) exceeds layer_divergence (0.02).
    from lora_doctor.measure.verdict import Thresholds

    code, report = audit(exports["bf16"], exports["real-size-adapter"], tmp_path)
    assert (code, set(report["thresholds"])) == (0, set(Thresholds().as_dict()))
    code, report = audit(exports["bf16"], exports["real-size-adapter"], tmp_path, "--threshold", "rounding_margin=0")
    assert (code, only_phase(report)["verdict"]) == (1, "diverged")


def test_bf16_export_merged_twice_is_double_counted(exports, tmp_path):
    code, report = audit(exports["bf16-merged-twice"], exports["real-size-adapter"], tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (1, "double_counted")
    assert layer_modules(phase["layers"]) == adapter_modules(exports["real-size-adapter"])
    assert all(layer["effective_scale"] == pytest.approx(2.0, abs=0.01) for layer in phase["layers"])


@pytest.mark.parametrize(("export", "code", "verdict", "scale"), [
    ("bf16-of-float32-merge", 0, "ok", 1.0), ("bf16-of-float32-merge-twice", 1, "double_counted", 2.0),
])
def test_bf16_export_of_a_float32_merge_is_judged_against_that_merge(exports, tmp_path, export, code, verdict, scale):
    # The float32 base merged in float32 and saved in bf16, with ‖ΔW‖/‖W0‖ = 2e-3: most of ΔW is below half
    # a bf16 ulp, and PEFT's merge in bf16 keeps another part of it than this single rounding does.
    found, report = audit(exports[export], exports["small-adapter"], tmp_path)
    phase = only_phase(report)
    assert (found, phase["verdict"]) == (code, verdict)
    assert phase["effective_scale"] == pytest.approx(scale, abs=0.01)
    assert layer_modules(phase["layers"]) == adapter_modules(exports["small-adapter"])
    assert all(layer["effective_scale"] == pytest.approx(scale, abs=0.05) for layer in phase["layers"])
    assert report["checkpoint"]["export"]["merged"] == {"in float32, saved in bf16": 14}


def test_a_real_size_lora_merged_twice_in_float32_then_saved_in_bf16_is_double_counted(exports, tmp_path):
    # ‖ΔW‖/‖W0‖ = 1e-2: what the second merge leaves beyond 2·D against the closest correct merge (0.36–0.49
    # of ‖D‖) is bf16's rounding, within an ulp of every element (`rounding` 0.76 of ‖D‖). A margin of
    # twice the merge's own rounding floor (0.33–0.46 here) read it as `diverged`.
    code, report = audit(exports["real-size-bf16-of-float32-merge-twice"], exports["real-size-adapter"], tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (1, "double_counted")
    assert all(layer["effective_scale"] == pytest.approx(2.0, abs=0.02) for layer in phase["layers"])


def test_changed_untouched_tensor_is_named(exports, tmp_path):
    from safetensors.torch import load_file, save_file

    export = tmp_path / "export"
    export.mkdir()
    weights = load_file(str(exports["correct"] / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    (export / "config.json").write_bytes((exports["correct"] / "config.json").read_bytes())
    code, report = audit(export, CHECKPOINT, tmp_path)
    phase = only_phase(report)
    assert (code, phase["verdict"]) == (1, "diverged")
    assert [d["tensor"] for d in report["checkpoint"]["export"]["first_differences"]] == ["model.norm.weight"]
    assert "model.norm.weight" in phase["explanation"]


def test_modules_to_save_are_compared_with_the_adapters_trained_copies(tmp_path):
    adapter, export = build_fixtures.export_with_modules_to_save(tmp_path / "adapter", tmp_path / "export")
    code, report = audit(export, adapter, tmp_path)
    assert (code, only_phase(report)["verdict"]) == (0, "ok")
    # The same export against the plain adapter: the trained norms are not the base's.
    code, report = audit(export, CHECKPOINT, tmp_path)
    assert (code, only_phase(report)["verdict"]) == (1, "diverged")
    assert "model.norm.weight" in {d["tensor"] for d in report["checkpoint"]["export"]["first_differences"]}


def test_saved_report_renders_and_keeps_the_exit_code(exports, tmp_path):
    folder = tmp_path / "report"
    run = run_cli("audit", exports["merged-twice"], "--adapter", CHECKPOINT, "--report", folder)
    assert run.exit_code == 1, run.stderr
    assert {p.name for p in folder.iterdir()} == {"report.json", "report.md", "report.html"}
    markdown = run_cli("report", folder / "report.json", "--format", "md")
    assert markdown.exit_code == 1
    assert "double_counted" in markdown.stdout and "export" in markdown.stdout
    terminal = run_cli("report", folder / "report.json")
    assert terminal.exit_code == 1 and "double_counted" in terminal.stdout


def test_audit_runs_without_vllm(exports, tmp_path):
    """A None entry in sys.modules makes any `import vllm` fail: the audit must not need it."""
    report = tmp_path / "r.json"
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from lora_doctor.cli import main\n"
        f"sys.argv = ['lora-doctor', 'audit', {str(exports['correct'])!r}, '--adapter', {str(CHECKPOINT)!r}, '--json', {str(report)!r}, '-q']\n"
        "main()\n"
    )
    done = run_process([sys.executable, "-c", code], timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["verdict"] == "pass"


def assert_exit_2(run, written: Path, needle: str) -> None:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.exit_code == 2, run.stderr
    assert len(lines) == 1 and needle in lines[0], run.stderr
    assert not written.exists()


def test_missing_export_folder(tmp_path):
    run = run_cli("audit", tmp_path / "nowhere", "--adapter", CHECKPOINT, "--json", tmp_path / "r.json")
    assert_exit_2(run, tmp_path / "r.json", "no such path")


def test_export_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    run = run_cli("audit", tmp_path / "empty", "--adapter", CHECKPOINT, "--json", tmp_path / "r.json")
    assert_exit_2(run, tmp_path / "r.json", "no *.safetensors weights")


def test_export_whose_shapes_do_not_match_the_base(exports, tmp_path):
    from safetensors.torch import load_file, save_file

    export = tmp_path / "export"
    export.mkdir()
    weights = load_file(str(exports["correct"] / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    run = run_cli("audit", export, "--adapter", CHECKPOINT, "--json", tmp_path / "r.json")
    assert_exit_2(run, tmp_path / "r.json", "model.layers.0.mlp.up_proj.weight is 383x128 in the export")


def test_index_naming_a_missing_shard(exports, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(exports["sharded"], export)
    (export / "model-00002-of-00006.safetensors").unlink()
    run = run_cli("audit", export, "--adapter", CHECKPOINT, "--json", tmp_path / "r.json")
    assert_exit_2(run, tmp_path / "r.json", "names shard model-00002-of-00006.safetensors")


def test_truncated_shard(exports, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    data = (exports["correct"] / "model.safetensors").read_bytes()
    (export / "model.safetensors").write_bytes(data[: len(data) - 1000])
    run = run_cli("audit", export, "--adapter", CHECKPOINT, "--json", tmp_path / "r.json")
    assert_exit_2(run, tmp_path / "r.json", "not a readable safetensors file")


def test_chunked_reading_returns_the_tensors(tmp_path):
    """Row chunks of a few hundred bytes, reassembled, equal the tensors safetensors loads."""
    from safetensors.torch import load_file

    from lora_doctor.adapter.weight_files import model_tensors, read_chunks

    tensors = model_tensors(BASE)
    names = sorted(tensors)
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for chunk in read_chunks([[tensors[name]] for name in names], chunk_bytes=700):
        pieces[names[chunk.group]].append(chunk.tensors[0].clone())
    loaded = load_file(str(BASE / "model.safetensors"))
    for name in names:
        assert torch.equal(torch.cat(pieces[name]), loaded[name]), name
    assert max(len(p) for p in pieces.values()) > 10


def test_an_export_names_an_export_cause_not_an_engine_one():
    from lora_doctor.catalog import CATALOG, cause_for
    from lora_doctor.result import PhaseResult

    def phase(name: str, measured: str = "engine") -> PhaseResult:
        return PhaseResult(0, name, False, "missing", "", 0.0, None, None, None, None, None, measured=measured)

    missing = CATALOG["missing"]
    assert cause_for(phase("export", measured="export")) == missing.audit_cause and "merge" in missing.audit_cause
    assert cause_for(phase("after-wake-up")) == missing.cause
    # A custom plan may name a phase "export": it measured an engine, and gets the engine's causes.
    assert cause_for(phase("export")) == missing.cause


def test_an_audit_report_saved_before_phases_said_what_they_measured_still_names_export_causes():
    from lora_doctor.catalog import CATALOG, cause_for
    from lora_doctor.result import SCHEMA_VERSION, Report

    saved = {
        "schema_version": SCHEMA_VERSION, "tool": {}, "environment": {}, "checkpoint": {}, "thresholds": {},
        "plan": {"name": "audit", "phases": ["export"]}, "verdict": "fail", "exit_code": 1,
        "phases": [{"index": 0, "name": "export", "with_adapter": False, "verdict": "missing", "explanation": "",
                    "effective_scale": 0.0, "kl_at_scale": None, "kl_mean": None, "kl_max": None,
                    "top1_agreement": None, "greedy_match": None}],
    }
    assert cause_for(Report.from_dict(saved).phases[0]) == CATALOG["missing"].audit_cause
    saved["plan"]["name"] = "merged"
    assert cause_for(Report.from_dict(saved).phases[0]) != CATALOG["missing"].audit_cause
