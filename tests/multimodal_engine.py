"""Measure the Qwen2.5-VL fixture on a real vLLM engine: `main(ADAPTER, RENAMED_ADAPTER)` returns mean
KL values (tests/test_multimodal.py calls it in the test process, beside the session's engines, which
closing this one leaves serving), or `python tests/multimodal_engine.py ADAPTER RENAMED_ADAPTER` (cwd =
the repository root) prints them as one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROMPT_COUNT = 4


def mean_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    """Mean over prompts and positions of KL(p ‖ q) of full-vocabulary log-prob rows."""
    per_prompt = [(a.exp() * (a - b)).sum(-1).mean() for a, b in zip(p, q)]
    return float(sum(per_prompt) / len(per_prompt))


def main(adapter: Path, renamed: Path) -> dict:
    from transformers import AutoTokenizer

    from lora_doctor.adapter.checkpoint import load_checkpoint
    from lora_doctor.engine.driver import Engine, EngineConfig
    from lora_doctor.measure.reference import Reference

    ckpt = load_checkpoint(adapter)
    reference = Reference(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    prompts_file = Path(__file__).resolve().parents[1] / "fixtures" / "prompts.jsonl"
    texts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()][:PROMPT_COUNT]
    prompts = [tokenizer(text).input_ids for text in texts]
    engine = Engine(ckpt.base_dir, EngineConfig(max_lora_rank=8, max_model_len=256))
    try:
        with_lora = engine.prompt_logprobs(prompts, engine.add_adapter(ckpt.adapter_dir, engine.new_adapter_id()))
        without = engine.prompt_logprobs(prompts)
        renamed_lora = engine.prompt_logprobs(prompts, engine.add_adapter(renamed.resolve(), engine.new_adapter_id()))
        lora_modules = sorted(m for m, kind in engine.rpc("lora_doctor_modules")[0]["modules"].items() if "WithLoRA" in kind)
    finally:
        engine.close()
    reference_with, reference_without = reference.prompt_logprobs(prompts, 1.0), reference.prompt_logprobs(prompts, 0.0)
    return {
        "reference_vs_engine_with_lora": mean_kl(reference_with, with_lora),
        "reference_vs_engine_without_lora": mean_kl(reference_without, without),
        "lora_effect": mean_kl(reference_with, without),
        "renamed_vs_without": mean_kl(renamed_lora, without),
        "engine_lora_modules": lora_modules,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
