"""The TRL recipe (examples/trl_grpo_probe.py) at a learning rate that moves the policy measurably, recording
how far it moves between its syncs.

    python tests/trl_moving_policy.py OUTPUT_DIR --json RESULTS.json

Beside the recipe's JSON, "policy_kl" lists, from the second step on, the mean KL over the prompts'
tokens between the policy after a step and after the step before: what a stale engine (still holding
the previous policy) would show. A healthy `ok` means the engine followed the policy only where this is
above the probe's own KL limit.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import trl_grpo_probe as recipe  # noqa: E402
from policy_kl import mean_kl, policy_log_probs  # noqa: E402

# The recipe's 1e-3 moved the policy by KL 3.2e-3 between its two steps, under the bf16 engine's KL
# limit (1.0e-2): a stale engine would have read ok. KL grows about as the square of the step.
LEARNING_RATE = 5e-3


def record_policy_log_probs(trainer, seen: list) -> None:
    from transformers import TrainerCallback

    trainer.args.learning_rate = LEARNING_RATE  # read when train() builds the optimizer

    tokenizer = trainer.processing_class
    texts = [json.loads(line)["prompt"] for line in recipe.PROMPTS.read_text().splitlines() if line.strip()]

    class PolicyLogProbs(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(policy_log_probs(model, tokenizer, texts))

    trainer.add_callback(PolicyLogProbs())


if __name__ == "__main__":
    output_dir, _, json_path = sys.argv[1:4]
    seen: list = []
    trainer, probe = recipe.run(output_dir, 2, prepare=lambda trainer: record_policy_log_probs(trainer, seen))
    code = recipe.report(trainer, probe, json_path)
    data = json.loads(Path(json_path).read_text())
    data["policy_kl"] = [mean_kl(newer, older) for older, newer in zip(seen, seen[1:])]
    Path(json_path).write_text(json.dumps(data))
    sys.exit(code)
