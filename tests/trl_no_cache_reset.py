"""The TRL recipe (examples/trl_grpo_probe.py) with a push that skips `reset_prefix_cache()`.

    python tests/trl_no_cache_reset.py OUTPUT_DIR --json RESULTS.json

Before training, the rollout engine generates the evaluation prompts once (an evaluation of the
starting policy), which leaves their KV blocks in its prefix cache (on: vLLM's default, as TRL
builds it). TRL's sync then pushes the merged weights without resetting the cache: every weight and
every prompt log-prob is right, but rollouts of those prompts read the blocks the old weights
computed. The probe, on the same prompts (the built-in set: a system prompt filling a 128-token
block), must name it `stale_cache` at the first sync and stop the run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import trl_grpo_probe as recipe  # noqa: E402

from lora_doctor.integrations import trl_grpo  # noqa: E402
from lora_doctor.measure.prompts import DEFAULT_PROMPTS  # noqa: E402


def push_without_reset(trainer) -> None:
    generation = trainer.vllm_generation

    def sync_weights():
        weights = [(name, tensor.detach().clone()) for name, tensor in generation._iter_named_params()]
        generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    generation.sync_weights = sync_weights


def evaluate_before_training(trainer) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = trainer.processing_class
    prompts = [TokensPrompt(prompt_token_ids=tokenizer(text).input_ids) for text in DEFAULT_PROMPTS]
    trainer.vllm_generation.llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)


if __name__ == "__main__":
    output_dir, _, json_path = sys.argv[1:4]
    trainer = recipe.build_trainer(output_dir, 2)
    push_without_reset(trainer)
    evaluate_before_training(trainer)
    probe = trl_grpo.add_probe(trainer)  # the built-in prompts, which reach the prefix cache
    trainer.train()
    sys.exit(recipe.report(trainer, probe, json_path))
