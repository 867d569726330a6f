"""TRL GRPO with a colocated vLLM engine and a PEFT LoRA policy, probed by lora-doctor after every sync.

    python examples/trl_grpo_probe.py OUTPUT_DIR [--steps N] [--json RESULTS.json]

Trains the bundled fixture policy (tiny-qwen2 + checkpoint-500) for a few GRPO steps; after each of
TRL's syncs the probe compares the engine with the policy and logs its figures through the trainer.
Prints one line per probe and exits 1 when a probe fails (the run is stopped there), 2 when no probe ran.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

# Before torch loads: OpenMP's idle threads wait passively instead of spinning beside the engine
# (see lora_doctor/cli.py); the script's own process, so the script sets it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lora_doctor.integrations import trl_grpo  # noqa: E402
from lora_doctor.output import write_file  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BASE = FIXTURES / "tiny-qwen2"
ADAPTER = FIXTURES / "checkpoint-500"
PROMPTS = FIXTURES / "prompts.jsonl"
FORMAT = re.compile(r"<think>.*?</think><answer>.*?</answer>", re.DOTALL)


def format_reward(completions, **kwargs):
    return [1.0 if FORMAT.search(completion) else 0.0 for completion in completions]


def distinct_characters(completions, **kwargs):
    """A reward that differs between samples, so every GRPO step has advantages and moves the policy."""
    return [len(set(completion)) / max(1, len(completion)) for completion in completions]


def build_trainer(output_dir: str, steps: int):
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(ADAPTER), is_trainable=True)
    config = GRPOConfig(
        output_dir=output_dir,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=256,
        max_steps=steps,
        per_device_train_batch_size=2,
        num_generations=2,
        steps_per_generation=1,
        max_completion_length=16,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    dataset = load_dataset("json", data_files=str(PROMPTS), split="train")
    with trl_grpo.engine_options():  # max_logprobs=-1 and lora-doctor's worker extension
        trainer = GRPOTrainer(model=policy, reward_funcs=[format_reward, distinct_characters], args=config, train_dataset=dataset, processing_class=tokenizer)
    if _vllm_on_cpu():
        push_through_reload_weights(trainer)
    return trainer


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def push_through_reload_weights(trainer) -> None:
    """vLLM's CPU build only: TRL pushes each weight with `model.load_weights`, which fails there
    (`'Parameter' object has no attribute 'weight_loader'`: the CPU backend repacks linear weights at
    start-up). The same merge → push → unmerge goes through `reload_weights` instead; TRL's own
    `_iter_named_params` still merges, names and unmerges the weights. It yields the parameters
    themselves and unmerges when exhausted, so each is copied while merged."""
    generation = trainer.vllm_generation

    def sync_weights():
        weights = [(name, tensor.detach().clone()) for name, tensor in generation._iter_named_params()]
        generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def run(output_dir: str, steps: int = 2, prepare=None):
    """Build the trainer, add the probe, train; `prepare(trainer)` may change the trainer first."""
    trainer = build_trainer(output_dir, steps)
    if prepare is not None:
        prepare(trainer)
    probe = trl_grpo.add_probe(trainer, prompts=str(PROMPTS))
    trainer.train()
    return trainer, probe


def report(trainer, probe, json_path: str | None) -> int:
    """One line per probe; with `json_path`, the results and what the trainer logged of them."""
    for result in probe.results:
        print(f"trl {result.name}: {result.verdict} α={result.effective_scale:.3f} kl_mean={result.kl_mean:.2e}")
    if json_path:
        logged = [entry for entry in trainer.state.log_history if any(key.startswith("lora_doctor/") for key in entry)]
        write_file(
            json_path,
            json.dumps(
                {
                    "global_step": trainer.state.global_step,
                    "results": [asdict(result) for result in probe.results],
                    "logged": logged,
                }
            ),
        )
    if not probe.results:
        # Nothing was measured (no step reached the probe): no healthy sync to report either.
        print("error: no probe ran (the run ended before its first optimizer step)", file=sys.stderr)
        return 2
    return 0 if all(result.ok for result in probe.results) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", help="write the probe results and the trainer's logged figures here")
    options = parser.parse_args(argv)
    trainer, probe = run(options.output_dir, options.steps)
    return report(trainer, probe, options.json)


if __name__ == "__main__":
    sys.exit(main())
