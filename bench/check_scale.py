"""Memory and time of `lora-doctor check` with a real-size vocabulary and real-size prompt sets.

Builds the model itself, no download: the bundled tiny-qwen2 with its embedding (tied to its
lm_head) grown to Qwen2's 151,936 rows; the bundled adapter unchanged. Then runs the check
(default plan swift-colocate-lora: phase 1 ok, phase 2 double_counted) as a fresh process at ~2k, ~4k and
~8k prompt positions (prompts of ~200 tokens) and prints per run: positions, peak RSS, wall, the
verdicts and the breakdown (reference, engine start, engine requests, fit, per-module read), and
the peak the formula in docs/memory.md gives for the run.
Targets (printed, not asserted): right verdicts and ≤ 6 GB peak RSS at ~4k positions; from 4k to 8k
positions peak RSS grows ≤ 10% and wall at most linearly; the fit ≤ 20% of a phase's time; the decode
path (rollouts generated through the prefix cache, their full-vocabulary log-probs, the reference
teacher-forced on them, and the A/B without the cache when it disagreed) ≤ 15% of a phase's time.

    python bench/check_scale.py [--prompts 10,20,40] [--tokens 200] [--plan NAME] [--paths]

`--paths` also measures the two ways of reading the engine's full-vocabulary log-probs for one
prompt: vLLM's per-entry Python output vs the worker-side tables lora-doctor uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lora_doctor, as the checks it runs (cwd = ROOT) use
FIXTURES = ROOT / "fixtures"
QWEN2_VOCAB = 151_936
# docs/memory.md: Python, torch, transformers and vLLM; the comparison's row blocks and what the allocator keeps of them.
M_RUNTIME = 1.0e9
M_BLOCKS = 0.25e9
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE", "VLLM_LOGGING_LEVEL": "ERROR"}


def build_model(folder: Path) -> Path:
    """tiny-qwen2 with Qwen2's vocabulary size (new rows initialised by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = folder / "tiny-qwen2-151936"
    if (model_dir / "config.json").is_file():
        return model_dir
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-qwen2", dtype=torch.float32)
    model.resize_token_embeddings(QWEN2_VOCAB)
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURES / "tiny-qwen2" / name, model_dir / name)
    return model_dir


def write_prompts(path: Path, count: int, tokens: int) -> int:
    """`count` prompts of about `tokens` tokens, made of the fixture's math questions; returns the
    number of positions the check scores (tokens − 1 per prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tiny-qwen2")
    questions = [json.loads(line)["prompt"] for line in (FIXTURES / "prompts.jsonl").read_text().splitlines() if line.strip()]
    positions = 0
    with path.open("w") as out:
        for n in range(count):
            text, k = "", n
            while len(tokenizer(text + questions[k % len(questions)], verbose=False).input_ids) <= tokens:
                text += questions[k % len(questions)] + " 7\n"
                k += 1
            out.write(json.dumps({"prompt": text + questions[k % len(questions)]}) + "\n")
            positions += len(tokenizer(text + questions[k % len(questions)], verbose=False).input_ids) - 1
    return positions


def formula_gb(model_dir: Path, prompts: Path, kv_gib: float = 1.0) -> float:
    """Peak resident memory by docs/memory.md's formula, in GB (float32: b = 4):
    M_runtime + 2·P·b + KV + (C + 4·L)·V·4 bytes + M_blocks."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from lora_doctor.measure.logit_pass import CHUNK_POSITIONS

    parameters = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            parameters += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines() if line.strip()]
    longest = max(len(tokenizer(text, verbose=False).input_ids) for text in texts)
    chunk = max(CHUNK_POSITIONS, longest)
    return (M_RUNTIME + 2 * parameters * 4 + kv_gib * (1 << 30) + (chunk + 4 * longest) * QWEN2_VOCAB * 4 + M_BLOCKS) / 1e9


def run_check(model_dir: Path, plan: str, prompts: Path, report: Path) -> tuple[int, float, float]:
    """Exit code, wall seconds and peak RSS (GB) of one check in a fresh process."""
    command = [sys.executable, "-m", "lora_doctor", "check", str(FIXTURES / "checkpoint-500"), "--base", str(model_dir),
               "--plan", plan, "--prompts", str(prompts), "--json", str(report), "-q"]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        sys.exit(f"check failed (exit {os.waitstatus_to_exitcode(status)}): {child.stderr.read().decode()[-2000:]}")
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def compare_paths(model_dir: Path, tokens: int) -> None:
    """Time and peak-RSS growth of one prompt's full-vocabulary log-probs, both ways, in this process."""
    os.environ.update(ENV)
    from transformers import AutoTokenizer

    from lora_doctor.engine.driver import Engine, EngineConfig, _dense_prompt_logprobs

    ids = AutoTokenizer.from_pretrained(model_dir)(("Question: what is 12 plus 7?\nAnswer: 19\n" * 40), verbose=False).input_ids[:tokens]
    engine = Engine(model_dir, EngineConfig(max_model_len=256))

    def measured(read):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
        started = time.perf_counter()
        read()
        return time.perf_counter() - started, _peak_rss_gb()

    base = _peak_rss_gb()
    flat = measured(lambda: [_dense_prompt_logprobs(o.prompt_logprobs, engine.vocab_size) for o in engine._prompt_requests([ids], -1, None, batch=False)])
    worker = measured(lambda: engine.prompt_logprobs([ids]))
    engine.close()
    print(f"one prompt of {len(ids)} tokens, {QWEN2_VOCAB:,}-token vocabulary (RSS before: {base:.2f} GB)")
    print(f"  vLLM's per-entry output   {flat[0]:6.1f} s   peak RSS {flat[1]:.2f} GB")
    print(f"  worker-side tables        {worker[0]:6.1f} s   peak RSS {worker[1]:.2f} GB")


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="10,20,40", help="prompt counts, one check each")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per prompt")
    parser.add_argument("--plan", default="swift-colocate-lora", help="e.g. tests/custom_plans.py:half_scale_merge (α = 0.5: the fit's steps)")
    parser.add_argument("--paths", action="store_true", help="also compare the two engine read paths")
    parser.add_argument("--keep", type=Path, help="build the model here and keep it (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lora-doctor-bench-") as tmp:
        folder = args.keep or Path(tmp)
        model_dir = build_model(folder)
        if args.paths:
            compare_paths(model_dir, min(args.tokens, 120))
        rows = []
        for count in (int(c) for c in args.prompts.split(",")):
            prompts = folder / f"prompts-{count}.jsonl"  # kept with --keep (for bench/rss_trace.py)
            positions = write_prompts(prompts, count, args.tokens)
            report_path = Path(tmp) / f"report-{count}.json"
            code, wall, rss = run_check(model_dir, args.plan, prompts, report_path)
            report = json.loads(report_path.read_text())
            rows.append((count, positions, code, wall, rss, report))
            _print_run(count, positions, code, wall, rss, report, formula_gb(model_dir, prompts))
        _print_scaling(rows)


def _print_run(count, positions, code, wall, rss, report, formula) -> None:
    phases = report["phases"]
    step = lambda name: sum(p["seconds"].get(name, 0.0) for p in phases)  # noqa: E731
    verdicts = ", ".join(f"{p['name']} {p['verdict']} α={p['effective_scale']:.3f}" for p in phases)
    expected = {"swift-colocate-lora": ["ok", "double_counted"]}.get(report["plan"]["name"])
    right = expected is None or [p["verdict"] for p in phases] == expected
    phase_total = sum(sum(p["seconds"].values()) for p in phases)
    print(f"\n{count} prompts, {positions} positions, vocab {QWEN2_VOCAB:,}: exit {code}, {verdicts} ({'as expected' if right else 'WRONG'})")
    print(f"  peak RSS {rss:.2f} GB (docs/memory.md's formula: {formula:.2f} GB; target at ~4k positions: <= 6 GB)   wall {wall:.1f} s")
    print(f"  reference load + greedy {report['seconds']['reference']:.1f} s   engine start {report['seconds']['engine_start']:.1f} s")
    decode = step("decode") + step("decode_no_cache")
    generated = sum(p.get("decode_positions", 0) for p in phases)
    print(f"  engine requests {step('engine'):.1f} s   reference log-probs {step('reference'):.1f} s   "
          f"fit {step('scale_fit'):.1f} s ({step('scale_fit') / phase_total:.0%} of the phases, target <= 20%)   per-module read {step('layers'):.1f} s")
    print(f"  decode path {decode:.1f} s over {generated} generated tokens ({decode / phase_total:.0%} of the phases, target <= 15%)   "
          f"base route {step('base_route'):.1f} s")


def _print_scaling(rows) -> None:
    by_positions = sorted(rows, key=lambda row: row[1])
    for (_, p1, _, w1, r1, _), (_, p2, _, w2, r2, _) in zip(by_positions, by_positions[1:]):
        print(f"\n{p1} → {p2} positions (×{p2 / p1:.2f}): peak RSS ×{r2 / r1:.2f} (target <= 1.10), wall ×{w2 / w1:.2f} (target <= ×{p2 / p1:.2f})")


if __name__ == "__main__":
    main()
