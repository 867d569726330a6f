"""Where the engine runs, and what follows from it.

Every decision that differs between vLLM's CUDA and CPU builds lives here, each a small function of
the platform ("cuda" or "cpu") and the engine's config, read from vLLM 0.32's own source (the file is
named next to each). The CPU build is where lora-doctor's tests run; the CUDA paths are these
functions, driven for both platforms by tests/test_platform.py against the installed vLLM's own
config classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BadInput, EnvironmentProblem

CUDA = "cuda"
CPU = "cpu"

# The vLLM release whose private internals the engine code reads (engine/driver.py, engine/compat.py,
# engine/capture.py, the worker extension): another release is named at start-up.
VLLM_VERSION = "0.32.0"

GIB = 1 << 30


def current_platform() -> str:
    """"cuda" on a CUDA (or ROCm) build of vLLM, "cpu" on the CPU build, else vLLM's device type;
    `EnvironmentProblem` (exit 3) when vLLM cannot be imported."""
    from .driver import import_vllm

    import_vllm()  # a vLLM that fails to import is the environment's, named in one line
    from vllm.platforms import current_platform as platform

    if platform.is_cuda_alike():
        return CUDA
    if platform.is_cpu():
        return CPU
    return str(platform.device_type)


def version_note(installed: str | None) -> str | None:
    """A line naming a vLLM other than the one the engine code was written against (None if it is)."""
    if installed is None or installed.split("+")[0] == VLLM_VERSION:
        return None
    return (
        f"vLLM {installed} is installed; lora-doctor reads the internals of vLLM {VLLM_VERSION} "
        f"(pip install 'lora-doctor[gpu]' pins it): a failure inside the engine may come from the difference"
    )


# --- dtype -------------------------------------------------------------------------------------


def default_dtype(platform: str, base_dtype: str) -> str:
    """The precision a check computes in when none is asked for: what the trainer's engine computes in.

    vLLM's `dtype="auto"` (config/model.py, `_resolve_auto_dtype`) takes the checkpoint's own dtype
    and casts a float32 checkpoint down to the platform's first supported dtype: bfloat16 on CUDA
    (Ampere and later; `platforms/cuda.py`). On the CPU build lora-doctor keeps a float32 base in
    float32: its engine and reference then agree to rounding, the loudest a check can be.
    """
    if base_dtype not in ("float32", "bfloat16", "float16"):
        base_dtype = "float32"
    if platform == CUDA and base_dtype == "float32":
        return "bfloat16"
    return base_dtype


def lora_dtype_problem(platform: str, dtype: str) -> str | None:
    """Why an engine with LoRA enabled cannot start in `dtype` on `platform` (None: it can).

    vLLM keeps the LoRA slots in the model's dtype (config/lora.py: `lora_dtype="auto"`), and on CUDA
    the LoRA kernels accept float16/bfloat16 only (lora/ops/triton_ops/lora_shrink_op.py:
    `assert inputs.dtype in [torch.float16, torch.bfloat16]`); the engine runs dummy adapters while it
    profiles memory at start-up, so a float32 engine fails there, after the reference has loaded.
    The CPU build's LoRA ops (lora/ops/torch_ops) take any dtype.
    """
    if platform == CUDA and dtype == "float32":
        return (
            "--dtype float32: vLLM's LoRA kernels on CUDA take float16 or bfloat16 only "
            "(a LoRA engine in float32 fails at start-up); use --dtype bfloat16, what the trainer's engine computes in"
        )
    return None


def check_dtype(platform: str, dtype: str) -> None:
    """Refuse, before anything loads (exit 2), a dtype the engine cannot run LoRA in."""
    problem = lora_dtype_problem(platform, dtype)
    if problem:
        raise BadInput(problem)


# --- memory ------------------------------------------------------------------------------------

# On CUDA, what the engine needs beyond weights and KV cache: activations of a profiling batch, the
# LoRA slots, the sampler's full-vocabulary tensors, CUDA's own context. vLLM profiles it at start-up;
# 2 GiB covers the models lora-doctor is run on (7B-70B at a batch of a few thousand tokens).
CUDA_HEADROOM_BYTES = 2 * GIB
# vLLM's own default share of the card (config/cache.py, `gpu_memory_utilization`): never more.
VLLM_DEFAULT_UTILIZATION = 0.92


@dataclass(frozen=True)
class MemoryPlan:
    """What the engine is given: its engine arguments, the variables set while it is built, and
    what the report says of it."""

    engine_args: dict
    environment: dict
    kv_cache_gib: float


def kv_cache_bytes_needed(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int) -> int:
    """Bytes of KV cache `tokens` positions take: keys and values, every layer."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes * tokens


def cuda_kv_bytes(kv_cache_gib: float | None, kv_bytes_needed: int) -> int:
    """The KV cache a CUDA engine is given: --kv-cache-gib, else twice what the check's prompts need,
    at least 1 GiB. The one budget the memory plan starts the engine with and the reference's device
    is chosen beside."""
    return int(kv_cache_gib * GIB) if kv_cache_gib is not None else max(GIB, 2 * kv_bytes_needed)


def engine_device_bytes(weights_bytes: int, kv_cache_gib: float | None, kv_bytes_needed: int) -> int:
    """What a CUDA engine takes of its device: weights + its KV cache + headroom (`memory_plan`)."""
    return weights_bytes + cuda_kv_bytes(kv_cache_gib, kv_bytes_needed) + CUDA_HEADROOM_BYTES


def memory_plan(
    platform: str,
    kv_cache_gib: float | None,
    *,
    environment_gib: str | None = None,
    default_cpu_gib: int = 1,
    weights_bytes: int = 0,
    kv_bytes_needed: int = 0,
    device_total: int | None = None,
    device_free: int | None = None,
) -> MemoryPlan:
    """The engine's memory, planned rather than left to vLLM's defaults.

    CPU (platforms/cpu.py): the KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB, read as the engine is built
    (it overrides `kv_cache_memory_bytes`): --kv-cache-gib, else the caller's variable, else
    `default_cpu_gib` (vLLM's own default reserves most of the machine).

    CUDA (v1/worker/gpu_worker.py, v1/worker/utils.py `request_memory`): `kv_cache_memory_bytes`
    sizes the KV cache (--kv-cache-gib, else twice what the check's prompts need, at least 1 GiB),
    and `gpu_memory_utilization` is only the share of the card vLLM insists is free at start-up:
    planned as weights + KV cache + headroom, so that a card shared with the trainer's process or a
    second job starts the engine; if even that is not free, the check stops with exit 3.
    """
    if platform != CUDA:
        gib = kv_cache_gib if kv_cache_gib is not None else int(environment_gib) if environment_gib else default_cpu_gib
        gib = int(math.ceil(gib))  # the variable takes whole GiB
        return MemoryPlan(engine_args={}, environment={"VLLM_CPU_KVCACHE_SPACE": str(gib)}, kv_cache_gib=float(gib))
    kv_bytes = cuda_kv_bytes(kv_cache_gib, kv_bytes_needed)
    args: dict = {"kv_cache_memory_bytes": kv_bytes}
    if device_total:
        needed = engine_device_bytes(weights_bytes, kv_cache_gib, kv_bytes_needed)
        free = device_free if device_free is not None else device_total
        if needed > free:
            raise EnvironmentProblem(
                f"not enough GPU memory for the engine: it needs about {needed / GIB:.1f} GiB (weights "
                f"{weights_bytes / GIB:.1f}, KV cache {kv_bytes / GIB:.1f}, headroom {CUDA_HEADROOM_BYTES / GIB:.0f}), "
                f"{free / GIB:.1f} GiB of {device_total / GIB:.1f} are free; free the card or lower --kv-cache-gib"
            )
        args["gpu_memory_utilization"] = round(min(VLLM_DEFAULT_UTILIZATION, math.ceil(100 * needed / device_total) / 100), 2)
    return MemoryPlan(engine_args=args, environment={}, kv_cache_gib=kv_bytes / GIB)


REFERENCE_DEVICES = ("auto", "cpu", "cuda")


def reference_device(platform: str, requested: str = "auto", *, device_free: int | None = None, engine_bytes: int = 0, reference_bytes: int = 0) -> str:
    """Where the reference (transformers + PEFT) runs: on the GPU when asked, or ("auto") when it fits
    there beside the engine the check is about to start (its weights + KV cache + headroom); else on
    the CPU, where it always fits beside the CPU build's engine."""
    if requested not in REFERENCE_DEVICES:
        raise BadInput(f"--reference-device {requested!r}: use one of {', '.join(REFERENCE_DEVICES)}")
    if requested == CUDA and platform != CUDA:
        raise BadInput("--reference-device cuda: the engine here is vLLM's CPU build, with no CUDA device beside it")
    if requested != "auto":
        return requested
    if platform == CUDA and device_free is not None and device_free >= engine_bytes + reference_bytes + CUDA_HEADROOM_BYTES:
        return CUDA
    return CPU


def device_memory(platform: str) -> tuple[int | None, int | None]:
    """(total, free) bytes of the device the engine will use; (None, None) off CUDA."""
    if platform != CUDA:
        return None, None
    import torch

    free, total = torch.cuda.mem_get_info()
    return total, free


# --- model runner ------------------------------------------------------------------------------

V1, V2 = "v1", "v2"
# lora-doctor's own engine pins the V1 model runner: its log-prob capture (engine/capture.py) hooks
# V1's `Sampler.gather_logprobs`. The CPU build runs V1 always (Model Runner V2 requires Triton:
# config/vllm.py, `use_v2_model_runner`); CUDA with Triton would otherwise choose V2.
PIN_V1 = {"VLLM_USE_V2_MODEL_RUNNER": "0"}


def model_runner(vllm_config) -> str:
    """The model runner an engine runs: vLLM's own decision (config/vllm.py, `use_v2_model_runner`)."""
    return V2 if vllm_config.use_v2_model_runner else V1


# Without the capture, vLLM returns a full-vocabulary table as Python objects of ~130 bytes an entry
# (measured, see engine/driver.py `prompt_logprobs`): a probe keeps a chunk of them under this.
UNCAPTURED_BUDGET_BYTES = 2 * GIB
UNCAPTURED_BYTES_PER_ENTRY = 130


def uncaptured_chunk_positions(vocab_size: int, budget: int = UNCAPTURED_BUDGET_BYTES) -> int:
    """Prompt positions per engine request when the engine's log-probs cannot be captured."""
    return max(1, budget // (UNCAPTURED_BYTES_PER_ENTRY * max(vocab_size, 1)))


def runner_note(runner: str) -> str | None:
    """What a trainer's engine on Model Runner V2 costs a probe (None on V1)."""
    if runner != V2:
        return None
    return (
        "the trainer's engine runs vLLM's Model Runner V2, whose sampler lora-doctor does not capture: its full-vocabulary "
        "log-probs come back as vLLM's per-entry Python objects, about 20 MB per position at a 150k vocabulary, so the "
        "probe reads them about 100 positions at a time (slower, same figures)"
    )


# --- tensor parallelism ------------------------------------------------------------------------


def module_read_problem(parallel_config) -> str | None:
    """Why the per-module read cannot see whole weights in this engine (None: it can).

    Under an external launcher (a trainer's colocated engine: torchrun, one engine per rank),
    `collective_rpc` answers with the local rank's result only (v1/executor/uniproc_executor.py,
    `ExecutorWithExternalLauncher`): with tensor parallelism each rank holds a shard of every module,
    and one shard is not the module.
    """
    ranks = parallel_config.tensor_parallel_size
    if ranks > 1 and parallel_config.distributed_executor_backend == "external_launcher":
        return (
            f"the engine is one of {ranks} tensor-parallel ranks launched by the trainer (external_launcher): "
            "each holds a shard of every module and vLLM answers with this rank's only; the logits are whole"
        )
    return None


# --- quantization ------------------------------------------------------------------------------


def quantization_problem(base_config: dict, engine_quantization: str | None = None) -> str | None:
    """Why a check of this base would misread (None: it would not).

    The reference computes in the base's dequantized weights and the per-module read dequantizes what
    the engine holds; quantization error, far above a real RL LoRA's ΔW (‖ΔW‖/‖W0‖ around 1e-2),
    would read as `diverged` or `partial`. A pre-quantized checkpoint names its method in
    config.json's `quantization_config` (vLLM's ModelConfig reads it there, config/model.py); an engine
    quantized on load names it in `quantization` (FP8, bitsandbytes).
    """
    config = base_config.get("text_config", base_config) if isinstance(base_config.get("text_config"), dict) else base_config
    declared = base_config.get("quantization_config") or config.get("quantization_config")
    method = None
    if isinstance(declared, dict):
        method = declared.get("quant_method") or declared.get("quant_type") or "quantized"
    elif declared:
        method = "quantized"
    method = engine_quantization or method
    if not method:
        return None
    return (
        f"the base is quantized ({method}): quantization error is far above an RL LoRA's ΔW and would read as a "
        "diverged sync; check the LoRA against the unquantized base (its bf16 or float32 checkpoint)"
    )
