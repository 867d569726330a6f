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

# The recipe's 1e-3 moved the policy by KL 3.2e-3 between its two steps, under the bf16 engine's KL
# limit (1.0e-2): a stale engine would have read ok. KL grows about as the square of the step.
LEARNING_RATE = 5e-3


def record_policy_log_probs(trainer, seen: list) -> None:
    import torch
    from transformers import TrainerCallback

    trainer.args.learning_rate = LEARNING_RATE  # read when train() builds the optimizer

    tokenizer = trainer.processing_class
    texts = [json.loads(line)["prompt"] for line in recipe.PROMPTS.read_text().splitlines() if line.strip()]

    class PolicyLogProbs(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            was_training = model.training
            model.eval()
            with torch.no_grad():
                seen.append([torch.log_softmax(model(**tokenizer(text, return_tensors="pt")).logits[0].float(), -1) for text in texts])
            model.train(was_training)

    trainer.add_callback(PolicyLogProbs())


def mean_kl(newer, older) -> float:
    """Mean over every prompt token of KL(newer ‖ older)."""
    kls = [(new.exp() * (new - old)).sum(-1) for new, old in zip(newer, older, strict=True)]
    return float(sum(kl.sum() for kl in kls) / sum(kl.numel() for kl in kls))


if __name__ == "__main__":
    output_dir, _, json_path = sys.argv[1:4]
    seen: list = []
    trainer, probe = recipe.run(output_dir, 2, prepare=lambda trainer: record_policy_log_probs(trainer, seen))
    code = recipe.report(trainer, probe, json_path)
    data = json.loads(Path(json_path).read_text())
    data["policy_kl"] = [mean_kl(newer, older) for older, newer in zip(seen, seen[1:])]
    Path(json_path).write_text(json.dumps(data))
    sys.exit(code)
