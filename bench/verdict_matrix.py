"""Plan × dtype × LoRA size → verdict per phase on the real-size fixtures, against the truth.

The bf16 base `fixtures/tiny-qwen2-bf16` with its LoRA scaled to ‖ΔW‖/‖W0‖ ≈ 1e-2 and ≈ 2e-3
(`fixtures/checkpoint-{500,250}-{1e-2,2e-3}`), each checked in float32 and bfloat16 with every
built-in plan whose phases have a known truth. One engine per dtype × size, each in its own process
(an engine's memory is only given back when its process ends).

    python bench/verdict_matrix.py                 # the table (4 engines, ~3 min on 2 idle cores)
    python bench/verdict_matrix.py --json out.json # and every report
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
sys.path.insert(0, str(ROOT))
from lora_doctor.measure.prompts import CHAT_SUFFIX, SYSTEM_PREFIX  # noqa: E402

FIXTURES = ROOT / "fixtures"
SIZES = ("1e-2", "2e-3")
DTYPES = ("float32", "bfloat16")
# Two short prompts: the verdicts must hold on little text, and every phase costs a full-vocabulary
# pass; a third behind the built-in system prompt and chat template fills a 128-token KV block, so
# the engine's prefix cache (on, vLLM's default) is read by every phase's rollouts.
PROMPTS = [
    "Question: what is 2 plus 5?\nAnswer:",
    "Question: what is 6 times 3?\nAnswer:",
    f"{SYSTEM_PREFIX}Question: what is 8 plus 13?{CHAT_SUFFIX}",
]
MAX_NEW_TOKENS = 8

# The truth per plan: the verdict of each phase (per dtype where it differs).
TRUTH: dict[str, dict[str, tuple[str, ...]]] = {
    "swift-colocate-lora": {dtype: ("ok", "double_counted") for dtype in DTYPES},
    "swift-fixed": {dtype: ("ok", "ok") for dtype in DTYPES},
    "merged": {dtype: ("ok", "ok") for dtype in DTYPES},
    "trl-sleep-reload": {dtype: ("ok", "missing") for dtype in DTYPES},
    "verl-adapter": {dtype: ("ok", "ok") for dtype in DTYPES},
    "adapter-reused-id": {dtype: ("stale",) for dtype in DTYPES},
    # A bf16 trainer's merge pushed into a float32 engine differs from the float32 W0 + ΔW by more
    # than rounding in float32 (diverged); in a bf16 run it is exactly what a bf16 merge holds (ok).
    "merged-bf16-drift": {"float32": ("diverged",), "bfloat16": ("ok",)},
}
# Per phase, the two parts every module must hold where the arithmetic is exact: (base_part,
# slot_part). None: no exact expectation (a bf16 merge read by a float32 run; the previous adapter).
PARTS: dict[str, dict[str, tuple[tuple[int, int] | None, ...]]] = {
    "swift-colocate-lora": {dtype: ((1, 0), (1, 1)) for dtype in DTYPES},
    "swift-fixed": {dtype: ((0, 1), (0, 1)) for dtype in DTYPES},
    "merged": {dtype: ((1, 0), (1, 0)) for dtype in DTYPES},
    "trl-sleep-reload": {dtype: ((1, 0), (0, 0)) for dtype in DTYPES},
    "verl-adapter": {dtype: ((0, 1), (0, 1)) for dtype in DTYPES},
    "adapter-reused-id": {dtype: (None,) for dtype in DTYPES},
    "merged-bf16-drift": {"float32": (None,), "bfloat16": ((1, 0),)},
}


def run_config(dtype: str, size: str) -> dict[str, dict]:
    """Every plan of TRUTH on one engine: plan name → report (as JSON data)."""
    from lora_doctor.checker import Checker
    from lora_doctor.plans.builtin import get_plan

    checkpoint = FIXTURES / f"checkpoint-500-{size}"
    previous = FIXTURES / f"checkpoint-250-{size}"
    with Checker(checkpoint, previous=previous, prompts=PROMPTS, dtype=dtype, max_new_tokens=MAX_NEW_TOKENS) as checker:
        return {plan: checker.run(get_plan(plan)).to_dict() for plan in TRUTH}


def run_matrix(in_process: bool = False) -> dict[tuple[str, str], dict[str, dict]]:
    """(dtype, size) → plan → report, one process per engine; or every engine in this process, one
    after the other (each closed before the next starts: the test suite's way, which pays no start-up
    of its own per engine)."""
    if in_process:
        return {(dtype, size): json.loads(json.dumps(run_config(dtype, size))) for dtype in DTYPES for size in SIZES}
    results = {}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", OMP_WAIT_POLICY="PASSIVE")
    with tempfile.TemporaryDirectory(prefix="lora-doctor-matrix-") as tmp:
        for dtype in DTYPES:
            for size in SIZES:
                out = Path(tmp) / f"{dtype}-{size}.json"
                done = subprocess.run(
                    [sys.executable, __file__, "--one", dtype, size, "--json", str(out)],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{dtype} {size} failed:\n{done.stderr[-3000:]}")
                results[(dtype, size)] = json.loads(out.read_text())
    return results


def rows(results: dict[tuple[str, str], dict[str, dict]]) -> list[dict]:
    """One row per plan × dtype × size: verdicts, truth, and the figures that decided them."""
    table = []
    for (dtype, size), reports in results.items():
        for plan, report in reports.items():
            phases = report["phases"]
            table.append({
                "plan": plan,
                "dtype": dtype,
                "size": size,
                "verdicts": tuple(p["verdict"] for p in phases),
                "truth": TRUTH[plan][dtype],
                "alpha": tuple(p["effective_scale"] for p in phases),
                "decided_by": tuple(p["decided_by"] for p in phases),
                "signal_to_noise": report["resolution"]["signal_to_noise"],
                "parts": tuple(_part_ranges(p) for p in phases),
                "merge_kept": tuple(p["merge_kept"] for p in phases),
                "warned": tuple(bool(p["warnings"]) for p in phases),
                "decode_kl": tuple(p.get("decode_kl_mean") for p in phases),
            })
    return table


def _part_ranges(phase: dict) -> tuple[float, float, float, float]:
    base = [layer["base_part"] for layer in phase["layers"]]
    slot = [layer["slot_part"] for layer in phase["layers"]]
    return min(base), max(base), min(slot), max(slot)


def _alpha(value: float, decided_by: str) -> str:
    """The logit fit's α, in parentheses where the logits cannot resolve the LoRA (noise only)."""
    return f"{value:.2f}" if "logits" in decided_by else f"({value:.2f})"


def markdown(table: list[dict]) -> str:
    lines = [
        "| plan | dtype | ‖ΔW‖/‖W0‖ | verdict per phase | truth | logit α | S/N | base part | slot part | decided by | decode KL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in table:
        mark = "✓" if row["verdicts"] == row["truth"] else "✗"
        parts = row["parts"]
        lines.append(
            f"| {row['plan']} | {row['dtype']} | {row['size']} | {mark} {', '.join(row['verdicts'])} | {', '.join(row['truth'])} "
            f"| {', '.join(_alpha(a, by) for a, by in zip(row['alpha'], row['decided_by']))} | {row['signal_to_noise']:.3g} "
            f"| {', '.join(f'{p[0]:.3f}–{p[1]:.3f}' for p in parts)} | {', '.join(f'{p[2]:.3f}–{p[3]:.3f}' for p in parts)} "
            f"| {', '.join(sorted(set(row['decided_by'])))} | {', '.join(f'{k:.1e}' for k in row['decode_kl'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every report here")
    parser.add_argument("--one", nargs=2, metavar=("DTYPE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, str(ROOT))
        reports = run_config(*args.one)
        args.json.write_text(json.dumps(reports))
        return
    started = time.perf_counter()
    results = run_matrix()
    table = rows(results)
    print(markdown(table))
    wrong = [row for row in table if row["verdicts"] != row["truth"]]
    print(f"\n{len(table) - len(wrong)}/{len(table)} rows as expected; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({f"{d} {s}": r for (d, s), r in results.items()}, indent=1))
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
