"""A training script's process: lora-doctor's gate at the top, then the trainer's own vLLM engine.

Run as a script (tests/test_caller_process.py); prints, as JSON, what the process held before and
after the gate and how the trainer's engine was built.
"""

from __future__ import annotations

import json
import logging
import os
import sys

MARK = "caller-process: "  # vLLM's engine prints on the same stdout as it shuts down


def vllm_variables(environment: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if name.startswith("VLLM_")}


def logging_state(logger: logging.Logger) -> tuple:
    return logger.level, [(type(h).__name__, h.level) for h in logger.handlers], logger.propagate, logging.getLogRecordFactory()


def main(checkpoint: str, base: str) -> None:
    import torch

    # A trainer that generates with vLLM imports it: what the import itself sets (TORCHINDUCTOR_*,
    # TRITON_*...) is the caller's process as vLLM leaves it, whoever imports it first.
    import vllm  # noqa: F401

    from lora_doctor import gate

    before = dict(os.environ)
    vllm_logger = logging.getLogger("vllm")
    logging_before = logging_state(vllm_logger)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    report = gate(checkpoint, plan="merged", kv_cache_gib=1)
    after = dict(os.environ)
    torch_as_found = torch.set_num_threads is set_num_threads and torch.get_num_threads() == threads
    import vllm.envs
    from vllm import LLM

    cache_after_gate = vllm.envs._is_envs_cache_enabled()
    logging_after = logging_state(vllm_logger)
    # The trainer's engine, built as a trainer builds it: no lora-doctor option, the process's settings.
    llm = LLM(model=base, dtype="float32", max_model_len=256, enforce_eager=True)
    print(
        MARK
        + json.dumps(
            {
                "vllm_before": vllm_variables(before),
                "environment_changed": sorted(name for name in {*before, *after} if before.get(name) != after.get(name)),
                "torch_as_found": torch_as_found,
                "gate_kv_cache_gib": report.environment["kv_cache_gib"],
                "gate_verdict": report.verdict,
                "envs_cached_after_gate": cache_after_gate,
                "logging_as_found": logging_after == logging_before,
                "trainer_log_level": vllm_logger.getEffectiveLevel(),
                "trainer_kv_cache_bytes": llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes,
                "trainer_engine_client": type(llm.llm_engine.engine_core).__name__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
