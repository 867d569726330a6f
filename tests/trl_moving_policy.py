"""The TRL recipe (examples/trl_grpo_probe.py) at a learning rate that moves the policy measurably, recording
how far it moves between its syncs.

    python tests/trl_moving_policy.py OUTPUT_DIR --json RESULTS.json

The probe runs on the built-in prompts (two of them behind a system prompt that fills a KV block), not
the recipe's. Beside the recipe's JSON, "policy_kl" lists, from the second step on, the mean KL over those
prompts' tokens between the policy after a step and after the step before: what a stale engine (still holding
the previous policy) would show. A healthy `ok` means the engine followed the policy only where this is
above the probe's own KL limit.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import trl_grpo_probe as recipe  # noqa: E402
from policy_kl import mean_kl, policy_log_probs  # noqa: E402

from lora_doctor.measure.prompts import DEFAULT_PROMPTS  # noqa: E402

# The recipe's 1e-3 moved the policy by KL 3.2e-3 between its two steps, under the bf16 engine's KL
# limit (1.0e-2): a stale engine would have read ok. KL grows about as the square of the step.
LEARNING_RATE = 5e-3
# The probe's prompts (the policy's KL is measured on the same): the built-in set, whose shared system
# prompt fills a 128-token KV block, so the probe's rollouts can read KV blocks an earlier probe left in
# the prefix cache unless the trainer resets it after its push; the recipe's own 13–15-token prompts
# fill none, and no missing reset could show on them.
PROBE_PROMPTS = DEFAULT_PROMPTS


def probe_on_long_prompts() -> None:
    """The recipe's `add_probe` call, with PROBE_PROMPTS for its prompts (the trainer's dataset unchanged)."""
    add_probe = recipe.trl_grpo.add_probe

    def on_long_prompts(trainer, **options):
        return add_probe(trainer, **{**options, "prompts": PROBE_PROMPTS})

    recipe.trl_grpo.add_probe = on_long_prompts


def record_policy_log_probs(trainer, seen: list) -> None:
    from transformers import TrainerCallback

    trainer.args.learning_rate = LEARNING_RATE  # read when train() builds the optimizer

    tokenizer = trainer.processing_class
    texts = PROBE_PROMPTS

    class PolicyLogProbs(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(policy_log_probs(model, tokenizer, texts))

    trainer.add_callback(PolicyLogProbs())


if __name__ == "__main__":
    output_dir, _, json_path = sys.argv[1:4]
    seen: list = []
    probe_on_long_prompts()
    trainer, probe = recipe.run(output_dir, 2, prepare=lambda trainer: record_policy_log_probs(trainer, seen))
    code = recipe.report(trainer, probe, json_path)
    data = json.loads(Path(json_path).read_text())
    data["policy_kl"] = [mean_kl(newer, older) for older, newer in zip(seen, seen[1:])]
    Path(json_path).write_text(json.dumps(data))
    sys.exit(code)
