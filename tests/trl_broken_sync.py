"""The TRL recipe (examples/trl_grpo_probe.py) with a broken sync: the unmerge after each push is skipped.

    python tests/trl_broken_sync.py OUTPUT_DIR --json RESULTS.json

TRL merges ΔW into the base weights, pushes them, and unmerges. Here the unmerge leaves the weights
merged while PEFT is told the adapter is unmerged (its merged flags cleared): the policy carries on
from W0 + ΔW with the adapter still on top, and the next push would hold W0 + 2ΔW. The probe must
name it at the first sync and stop the run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import trl_grpo_probe as recipe  # noqa: E402


def skip_unmerge(trainer) -> None:
    from peft.tuners.lora import LoraLayer

    model = trainer.model

    def forget_the_merge():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merged_adapters.clear()

    model.unmerge_adapter = forget_the_merge


if __name__ == "__main__":
    output_dir, _, json_path = sys.argv[1:4]
    trainer, probe = recipe.run(output_dir, 2, prepare=skip_unmerge)
    sys.exit(recipe.report(trainer, probe, json_path))
