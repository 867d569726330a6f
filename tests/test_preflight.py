"""`inspect_checkpoint`: real PEFT adapters, one per thing an engine refuses, drops or scales differently.

No engine: every adapter is built with PEFT on the fixture base (or a variant of it) in tmp_path.
Assertions are on finding codes, severities and exit codes, not on wording."""

from __future__ import annotations

import json
import shutil
import warnings
from io import StringIO
from pathlib import Path

import pytest
import torch
from conftest import BASE, CHECKPOINT
from rich.console import Console

from lora_doctor.engine.serving import vllm_lora_ranks
from lora_doctor.errors import BadInput
from lora_doctor.preflight import PreflightReport, inspect_checkpoint
from lora_doctor.report.preflight import render_preflight_json, render_preflight_terminal


def build_adapter(out: Path, model=None, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter (B ≠ 0) of the fixture base, or of `model`, into `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(BASE)  # absolute path: the adapter config names it
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's tied-embedding / save_embedding_layers notices
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
        peft_model.save_pretrained(out)
    return out


def variant_of_base(**changes):
    """A randomly initialised Qwen2 like the fixture base, with some config fields changed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config.from_pretrained(BASE)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def only(report: PreflightReport, code: str):
    found = report.by_code(code)
    assert len(found) == 1, report.codes
    return found[0]


def test_clean_fixture_has_no_findings():
    report = inspect_checkpoint(CHECKPOINT)
    assert report.findings == []
    assert report.exit_code == 0
    data = json.loads(render_preflight_json(report))
    assert data["schema_version"] == 1 and data["kind"] == "preflight"
    assert data["exit_code"] == 0 and data["findings"] == []
    ckpt = data["checkpoint"]
    assert (ckpt["r"], ckpt["lora_alpha"], ckpt["scaling"], ckpt["use_rslora"]) == (8, 16, 2.0, False)
    assert ckpt["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert Path(ckpt["base_path"]) == BASE.resolve()


def test_modules_to_save_lm_head(tmp_path):
    report = inspect_checkpoint(build_adapter(tmp_path / "a", modules_to_save=["lm_head"]))
    finding = only(report, "modules_to_save")
    assert finding.severity == "problem"
    assert "lm_head" in finding.subjects
    assert "missing_target" not in report.codes and "unrecognized_tensor" not in report.codes
    assert report.exit_code == 1


def test_lora_on_lm_head_of_a_tied_base(tmp_path):
    report = inspect_checkpoint(build_adapter(tmp_path / "a", target_modules=["q_proj", "lm_head"]))
    assert only(report, "lora_on_lm_head").severity == "problem"
    # The tied head resolves to the input embedding: it is neither missing nor misshapen.
    assert "missing_target" not in report.codes and "shape_mismatch" not in report.codes
    assert report.exit_code == 1


def test_lora_on_embed_tokens(tmp_path):
    report = inspect_checkpoint(build_adapter(tmp_path / "a", target_modules=["q_proj", "embed_tokens"]))
    finding = only(report, "lora_on_embed_tokens")
    assert finding.severity == "problem"
    assert "model.embed_tokens" in finding.subjects
    assert "shape_mismatch" not in report.codes and "lora_on_lm_head" not in report.codes
    assert report.exit_code == 1


def test_lora_on_embeddings_is_served_for_architectures_that_declare_them(tmp_path):
    adapter = build_adapter(tmp_path / "a", target_modules=["q_proj", "embed_tokens", "lm_head"])
    granite = tmp_path / "granite-like"
    shutil.copytree(BASE, granite)
    config = json.loads((granite / "config.json").read_text())
    config["architectures"] = ["GraniteForCausalLM"]
    (granite / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(adapter, base=granite)
    assert only(report, "lora_on_lm_head").severity == "info"
    assert only(report, "lora_on_embed_tokens").severity == "info"
    assert report.exit_code == 0


def test_dora(tmp_path):
    report = inspect_checkpoint(build_adapter(tmp_path / "a", use_dora=True))
    assert only(report, "dora").severity == "problem"
    assert "unrecognized_tensor" not in report.codes  # the magnitude vectors are DoRA's, not unknown
    assert report.exit_code == 1


def test_rank_and_alpha_patterns_are_warnings(tmp_path):
    adapter = build_adapter(
        tmp_path / "a",
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 8},
        alpha_pattern={"down_proj": 32},
    )
    report = inspect_checkpoint(adapter)
    rank, alpha = only(report, "rank_pattern"), only(report, "alpha_pattern")
    assert rank.severity == alpha.severity == "warning"
    assert set(rank.subjects) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert set(alpha.subjects) == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    assert report.exit_code == 0


def test_rank_above_max_lora_rank(tmp_path):
    adapter = build_adapter(tmp_path / "a", r=128, lora_alpha=256)
    report = inspect_checkpoint(adapter, max_lora_rank=64)
    assert only(report, "rank_above_max").severity == "problem"
    assert report.exit_code == 1
    # Without --max-lora-rank: vLLM's default (16) is too small, which is only worth knowing.
    default = inspect_checkpoint(adapter)
    assert only(default, "rank_above_default_max").severity == "info"
    assert "rank_above_max" not in default.codes and default.exit_code == 0
    assert inspect_checkpoint(adapter, max_lora_rank=128).exit_code == 0


def test_vllm_allowed_ranks_are_read_from_the_installed_source():
    allowed, default = vllm_lora_ranks()
    assert default in allowed and 64 in allowed and allowed == tuple(sorted(allowed))


def test_nan_and_inf_in_adapter_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "checkpoint-nan"
    shutil.copytree(CHECKPOINT, path)
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    tensors[key][1, 1] = float("inf")
    save_file(tensors, path / "adapter_model.safetensors")
    finding = only(inspect_checkpoint(path, base=BASE), "nan_inf")
    assert finding.severity == "problem"
    assert finding.subjects == ("model.layers.1.mlp.down_proj.lora_B.weight",)


def test_target_the_base_does_not_have(tmp_path):
    # Trained on a 3-layer sibling: layer 2's modules do not exist in the 2-layer fixture base.
    adapter = build_adapter(tmp_path / "a", model=variant_of_base(num_hidden_layers=3, layer_types=["full_attention"] * 3))
    report = inspect_checkpoint(adapter, base=BASE)
    finding = only(report, "missing_target")
    assert finding.severity == "problem"
    assert set(finding.subjects) == {"model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"}
    assert "shape_mismatch" not in report.codes
    assert report.exit_code == 1


def test_adapter_shapes_that_do_not_fit_the_base(tmp_path):
    adapter = build_adapter(
        tmp_path / "a", model=variant_of_base(intermediate_size=256), target_modules=["q_proj", "down_proj"]
    )
    report = inspect_checkpoint(adapter, base=BASE)
    finding = only(report, "shape_mismatch")
    assert finding.severity == "problem"
    assert set(finding.subjects) == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    assert report.exit_code == 1


def test_float32_adapter_on_a_bfloat16_base(tmp_path):
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "tiny-qwen2-bf16"
    AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16).save_pretrained(bf16)
    report = inspect_checkpoint(CHECKPOINT, base=bf16)
    finding = only(report, "dtype_mismatch")
    assert finding.severity == "info"
    assert report.checkpoint["base_dtype"] == "bfloat16" and report.checkpoint["adapter_dtype"] == "float32"
    assert report.exit_code == 0


def test_rslora_is_info_and_bias_is_a_problem(tmp_path):
    rs = inspect_checkpoint(build_adapter(tmp_path / "rs", use_rslora=True, r=16, lora_alpha=16))
    assert only(rs, "rslora").severity == "info" and rs.exit_code == 0
    assert rs.checkpoint["scaling"] == pytest.approx(16 / 4)
    bias = inspect_checkpoint(build_adapter(tmp_path / "bias", bias="lora_only"))
    assert only(bias, "bias").severity == "problem" and bias.exit_code == 1


def test_findings_are_ordered_by_severity_and_rendered(tmp_path):
    adapter = build_adapter(tmp_path / "a", use_dora=True, rank_pattern={"v_proj": 8}, use_rslora=True)
    report = inspect_checkpoint(adapter)
    order = [f.severity for f in report.findings]
    assert order == sorted(order, key=("problem", "warning", "info").index)
    console = Console(file=StringIO(), width=200, color_system=None)
    render_preflight_terminal(report, console)
    text = console.file.getvalue()
    assert "dora" in text and "rank_pattern" in text and "rslora" in text
    assert text.rstrip().splitlines()[-1] == f"preflight: {len(report.problems)} problems, {len(report.warnings)} warnings"
    data = json.loads(render_preflight_json(report))
    assert [f["code"] for f in data["findings"]] == report.codes
    assert all(set(f) >= {"code", "severity", "message", "fix"} for f in data["findings"])
    assert data["exit_code"] == 1


@pytest.mark.parametrize("case", ["missing_path", "no_adapter_config", "corrupt_weights", "base_not_found", "explicit_base_not_found"])
def test_bad_input(tmp_path, case):
    path, base = tmp_path / "checkpoint", None
    if case == "missing_path":
        path = tmp_path / "does-not-exist"
    elif case == "no_adapter_config":
        path = BASE
    else:
        shutil.copytree(CHECKPOINT, path)
        if case == "corrupt_weights":
            (path / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
        elif case == "base_not_found":
            config = json.loads((path / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = "../no-such-base"
            (path / "adapter_config.json").write_text(json.dumps(config))
        else:
            base = tmp_path / "no-such-base"
    with pytest.raises(BadInput) as error:
        inspect_checkpoint(path, base=base)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "CohereForCausalLM", "ExaoneForCausalLM"])
def test_the_embedding_lora_table_is_the_installed_vllms(arch):
    # Llama and Qwen3 serve LoRA on the head and the embedding, Qwen2 on neither, Cohere on the
    # embedding only: as each model class declares it in the installed vLLM.
    from lora_doctor.engine.driver import import_vllm
    from lora_doctor.engine.serving import EMBEDDING_LORA_ARCHITECTURES

    import_vllm()
    from vllm.model_executor.models.registry import ModelRegistry

    declared = frozenset(getattr(ModelRegistry._try_load_model_cls(arch), "embedding_modules", None) or {})
    assert EMBEDDING_LORA_ARCHITECTURES.get(arch, frozenset()) == declared
