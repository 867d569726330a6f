"""Wall time of `lora-doctor check` on the fixture vs a bare vLLM engine start + one request.

Both run as fresh processes in the same run, so imports and engine start-up count on both sides;
the ratio is the figure to compare across machines (target: at most 1.2). From the check's own
JSON report it also prints where the check's time goes, including the per-layer weight read as a
fraction of the whole check.

    python bench/check_overhead.py [--plan swift-colocate-lora] [--checkpoint fixtures/checkpoint-500] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "fixtures" / "checkpoint-500"
BASE = ROOT / "fixtures" / "tiny-qwen2"
PROMPTS = ROOT / "fixtures" / "prompts.jsonl"

BARE_ENGINE = """
import json, sys
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
base, prompts = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(base)
texts = [json.loads(line)["prompt"] for line in open(prompts) if line.strip()]
llm = LLM(model=base, dtype="float32", enforce_eager=True, max_model_len=256, max_logprobs=-1)
params = SamplingParams(max_tokens=1, prompt_logprobs=-1, detokenize=False)
llm.generate([TokensPrompt(prompt_token_ids=tokenizer(t).input_ids) for t in texts], params, use_tqdm=False)
if "--exit-at-once" in sys.argv:  # as lora-doctor's command ends: no interpreter or engine teardown
    import os
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    destroy_model_parallel()  # and, as lora-doctor does, no vLLM rendezvous file left in /tmp
    destroy_distributed_environment()
    sys.stdout.flush()
    os._exit(0)
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="swift-colocate-lora")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="the adapter; the bare engine loads its base")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="ERROR")
    lora_doctor = Path(sys.executable).with_name("lora-doctor")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint.resolve()
        # The base the adapter names (relative to its folder, as the fixtures write it).
        base = (checkpoint / json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]).resolve()
        check_cmd = [str(lora_doctor), "check", str(checkpoint), "--plan", args.plan, "--prompts", str(PROMPTS), "--json", f"{tmp}/r.json", "-q"]
        bare_cmd = [sys.executable, "-c", BARE_ENGINE, str(base), str(PROMPTS)]
        checks, bares, quick_bares, reports = [], [], [], []
        for _ in range(args.repeat):
            bare, code = timed(bare_cmd, env)
            if code != 0:
                sys.exit(f"bare engine run failed (exit {code})")
            quick_bare, code = timed([*bare_cmd, "--exit-at-once"], env)
            if code != 0:
                sys.exit(f"bare engine run (exit at once) failed (exit {code})")
            quick_bares.append(quick_bare)
            check, code = timed(check_cmd, env)
            if code not in (0, 1):
                sys.exit(f"lora-doctor check failed (exit {code})")
            bares.append(bare)
            checks.append(check)
            reports.append(json.loads(Path(f"{tmp}/r.json").read_text()))
    best = min(range(len(checks)), key=checks.__getitem__)
    bare, quick_bare, check, report = min(bares), min(quick_bares), checks[best], reports[best]
    print(f"plan                       {args.plan}")
    print(f"checkpoint                 {args.checkpoint}")
    print(f"bare engine + 1 request    {bare:7.1f} s   (the interpreter's and vLLM's own teardown included)")
    print(f"  the same, os._exit at end {quick_bare:6.1f} s   (no teardown, as lora-doctor's command ends)")
    print(f"lora-doctor check          {check:7.1f} s")
    print(f"ratio (target <= 1.2)      {check / bare:7.2f}")
    print(f"ratio to the no-teardown bare run {check / quick_bare:5.2f}")
    stages = report["seconds"]
    steps: dict[str, float] = {}
    for phase in report["phases"]:
        for step, seconds in phase["seconds"].items():
            steps[step] = steps.get(step, 0.0) + seconds
    print("inside the check (from its JSON report):")
    for name, seconds in [*stages.items(), *(("  phases: " + k, v) for k, v in steps.items())]:
        print(f"  {name:<24} {seconds:7.2f} s")
    print(f"per-layer read / whole check {steps.get('layers', 0.0) / check:7.1%}")


if __name__ == "__main__":
    main()
