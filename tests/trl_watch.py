"""A TRL GRPO run of the fixture policy watched by lora-doctor at every step, healthy or broken from step 4.

    python tests/trl_watch.py MODE OUTPUT_DIR --json RESULTS.json [--steps 6] [--beta 0] [--adapter DIR] [--fresh-adapter] [--base-every 1] [--keep-going]

MODE: healthy; double (from step 4 the push holds W0 + 2ΔW, what a double count through TRL's merged
path gives); skipped (from step 4 no push: the engine keeps step 3's policy); stale_cache (the prompts
behind a shared system prompt longer than a KV block, and from step 4 the push skips
`reset_prefix_cache()`). The recipe's trainer (examples/trl_grpo_probe.py: colocated vLLM, the push
routed through `reload_weights` on the CPU build) with 4 completions of 16 tokens a step. The JSON
holds the watch's records, its probes' verdicts, and TRL's own `sampling/sampling_logp_difference/mean`
per step. With --keep-going the watch does not stop the run at a failed probe. Exits 1 when a probe
measured a failure. --adapter: another
fixture adapter of the same base (default checkpoint-500, whose LoRA moves the sampled tokens' log-probs
by ~7 nats; checkpoint-500-1e-2 by ~0.15, within first order).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import trl_grpo_probe as recipe  # noqa: E402

from lora_doctor.integrations import trl_grpo  # noqa: E402
from lora_doctor.measure.prompts import CHAT_SUFFIX, SYSTEM_PREFIX  # noqa: E402
from lora_doctor.output import write_file  # noqa: E402

MODES = ("healthy", "double", "skipped", "stale_cache")
BREAK_STEP = 4
TRL_GAP = "sampling/sampling_logp_difference/mean"


def build_trainer(output_dir: str, mode: str, steps: int, beta: float, learning_rate: float, adapter: Path, fresh: bool = False):
    from datasets import Dataset, load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(recipe.BASE)
    peft_config = None
    if fresh:
        # A new LoRA of the fixture's shape (B = 0), made by TRL from `peft_config`: with beta > 0 its reference is
        # then the policy with the adapter disabled, the base (a PeftModel passed in gets a frozen copy of its
        # adapter, named "ref", as the reference instead).
        from peft import LoraConfig

        known = json.loads((adapter / "adapter_config.json").read_text())
        peft_config = LoraConfig(r=known["r"], lora_alpha=known["lora_alpha"], target_modules=known["target_modules"], task_type="CAUSAL_LM")
        policy = AutoModelForCausalLM.from_pretrained(recipe.BASE)
    else:
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.BASE), str(adapter), is_trainable=True)
    arguments = GRPOConfig(
        output_dir=output_dir,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=256,
        max_steps=steps,
        per_device_train_batch_size=4,
        num_generations=2,
        steps_per_generation=1,
        max_completion_length=16,
        learning_rate=learning_rate,
        beta=beta,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    dataset = load_dataset("json", data_files=str(recipe.PROMPTS), split="train")
    if mode == "stale_cache":
        # Every prompt behind the same system prompt and chat template: a shared prefix of 142 tokens that fills
        # a 128-token KV block, which the rollouts of one step leave in the prefix cache for the next.
        dataset = Dataset.from_list([{"prompt": f"{SYSTEM_PREFIX}{row['prompt']}{CHAT_SUFFIX}"} for row in dataset])
    with trl_grpo.engine_options():
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=[recipe.format_reward, recipe.distinct_characters],
            args=arguments,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    recipe.push_through_reload_weights(trainer)
    return trainer


def break_from_step(trainer, mode: str) -> None:
    """From BREAK_STEP on, the push does what `mode` says; before, the recipe's healthy push."""
    generation = trainer.vllm_generation
    healthy = generation.sync_weights
    model = trainer.model

    def sync_weights():
        if mode == "healthy" or trainer.state.global_step + 1 < BREAK_STEP:
            return healthy()
        if mode == "skipped":
            return None
        if mode == "double":
            # W0, read unmerged in the order TRL's `_iter_named_params` walks (it skips the LoRA factors).
            unmerged = [p.detach().clone() for name, p in model.named_parameters() if model.prefix not in name and "original_module" not in name]
            merged = [(name, tensor.detach().clone()) for name, tensor in generation._iter_named_params()]
            assert len(unmerged) == len(merged)
            weights = [(name, 2 * w - w0) for (name, w), w0 in zip(merged, unmerged)]  # W0 + 2ΔW
            generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            generation.llm.reset_prefix_cache()
            return None
        # stale_cache: the right weights, the prefix cache kept.
        weights = [(name, tensor.detach().clone()) for name, tensor in generation._iter_named_params()]
        generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        return None

    generation.sync_weights = sync_weights


def step_times(trainer) -> dict[int, float]:
    """Wall seconds of every optimizer step (generation, the watch, the update), by step."""
    from transformers import TrainerCallback

    seconds: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds[state.global_step] = time.perf_counter() - self.began

    trainer.add_callback(Clock())
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("output_dir")
    parser.add_argument("--json", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--adapter", type=Path, default=recipe.ADAPTER)
    parser.add_argument("--base-every", type=int, default=1)
    parser.add_argument("--fresh-adapter", action="store_true", help="a new LoRA of the adapter's shape instead of the adapter")
    parser.add_argument("--keep-going", action="store_true")
    options = parser.parse_args(argv)

    trainer = build_trainer(options.output_dir, options.mode, options.steps, options.beta, options.learning_rate, options.adapter, options.fresh_adapter)
    break_from_step(trainer, options.mode)
    seconds = step_times(trainer)
    log_file = Path(options.output_dir) / "watch.jsonl"
    watch = trl_grpo.add_watch(trainer, log_file=log_file, stop_on_failure=not options.keep_going, base_every=options.base_every)
    trainer.train()

    trl_gap = {entry["step"]: entry[TRL_GAP] for entry in trainer.state.log_history if TRL_GAP in entry}
    logged = [entry for entry in trainer.state.log_history if any(key.startswith("lora_doctor/") for key in entry)]
    probes = {
        step: {
            key: getattr(result, key)
            for key in ("verdict", "effective_scale", "explanation", "not_measured", "kl_mean", "kl_limit", "decode_kl_mean", "decode_kl_no_cache", "decode_cache_blocks")
        }
        for step, result in watch.probes.items()
    }
    write_file(
        options.json,
        json.dumps(
            {
                "mode": options.mode,
                "beta": options.beta,
                "global_step": trainer.state.global_step,
                "records": [asdict(record) for record in watch.records],
                "json_lines": [json.loads(line) for line in log_file.read_text().splitlines()],
                "trl_logp_difference_mean": trl_gap,
                "probes": probes,
                "logged": logged,
                "step_seconds": seconds,
            },
            default=str,
        ),
    )
    for record in watch.records:
        alpha = "n/a" if record.alpha_hat is None else f"{record.alpha_hat:.3f} ± {record.alpha_hat_uncertainty:.3f}"
        print(
            f"trl watch {options.mode} step {record.step}: TRL gap {trl_gap.get(record.step, float('nan')):.4f} "
            f"α̂ {alpha} flagged {record.flagged} probe {record.probe_verdict} ({record.reason})"
        )
    # 1 when a probe measured a failure (the run stopped there, or went on with --keep-going).
    failed = [result for result in watch.probes.values() if result.verdict != "ok" and "engine" not in result.not_measured]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
