"""How a check's peak resident memory grows with the model: `check --plan merged` and `--plan swift-fixed`
on three random Qwen2-shaped models of increasing size, each with a rank-16 LoRA on every linear layer.

The models are generated on the spot (random weights in float32, the bundled tiny-qwen2's tokenizer and
vocabulary, so the growth is in the decoder layers), with a random LoRA (B ≠ 0: every ΔW moves the
weights). Each check runs as a fresh process (`--dtype float32`, three of the bundled prompts); the
proportional set size (PSS) of its process tree is sampled every 20 ms. Prints per model its
parameters, float32 GB, each plan's peaks (the tree's PSS, and the check process's own VmHWM) and
wall time, then the slope: the peak's growth per added float32 GB of weights, between consecutive
sizes and from the smallest to the largest. docs/memory.md: on CPU the reference and the engine each
hold a copy (2×); target ≤ 2.5×.

    python bench/check_model_scale.py [--sizes 512x8,768x16,1024x20] [--plans merged,swift-fixed] [--keep DIR]

`--sizes` is hidden size × decoder layers (intermediate size 3 × hidden, head size 64, 4 query heads
per kv head). `--keep DIR` builds (or reuses) the models in DIR and leaves them there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lora_doctor, as the checks it runs (cwd = ROOT) use
FIXTURES = ROOT / "fixtures"
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE", "VLLM_LOGGING_LEVEL": "ERROR"}
LORA_RANK = 16
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAMPLE_SECONDS = 0.02
TARGET_SLOPE = 2.5
PROMPTS = 3


def build(folder: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """A random Qwen2-shaped base and a rank-16 LoRA on every linear layer; (base, adapter, parameters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base_dir, adapter_dir = folder / f"qwen2-{hidden}x{layers}", folder / f"lora-{hidden}x{layers}"
    config = AutoConfig.from_pretrained(FIXTURES / "tiny-qwen2")
    heads = hidden // 64
    config.update(dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                       layer_types=["full_attention"] * layers))
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        torch.manual_seed(hidden * 1000 + layers)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(base_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(FIXTURES / "tiny-qwen2" / name, base_dir / name)
        peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LINEAR))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.02)
        peft_model.save_pretrained(adapter_dir)
        del model, peft_model
    parameters = sum(_numel(info.shape) for info in _tensors(base_dir))
    return base_dir, adapter_dir, parameters


def _tensors(base_dir: Path):
    from lora_doctor.adapter.weight_files import model_tensors

    return model_tensors(base_dir).values()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# A check's first run on new shapes may have torch compile vLLM's CPU kernels: a compiler's processes are
# not the check's memory.
COMPILERS = {"cc1plus", "cc1", "g++", "gcc", "c++", "cc", "as", "ld", "collect2"}


def tree_pss(pid: int) -> int | None:
    """Proportional set size of a process and all its descendants but compilers, in bytes; None when
    the tree changed while it was read (a child started, ended or exec'd: then its pages may be counted
    in both processes, as its parent's and as its own before the exec, and one check's 2.9 GB read as
    5.3 GB). PSS, not RSS: a child forked from the check (a subprocess it starts) shares the check's
    pages, and a sum of RSS counted them twice (4.45 GB measured for a 2.4 GB check)."""
    before = _proc_tree(pid)
    total = sum(_proc_pss(each) for each, _name in before)
    return total if _proc_tree(pid) == before else None


def _proc_tree(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of `pid` and its descendants but compilers, from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    names = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                name, parent = stat[stat.index("(") + 1 : stat.rindex(")")], int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            names[int(entry.name)] = name
            if name not in COMPILERS:
                children.setdefault(parent, []).append((int(entry.name), name))
    found, todo = [], [(pid, names.get(pid, ""))]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current[0], [])
    return sorted(found)


def _proc_pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_check(base_dir: Path, adapter_dir: Path, plan: str, prompts: Path, report: Path) -> tuple[int, float, float, float]:
    """Exit code, wall seconds, the process tree's peak PSS (GB, sampled) and the check process's own
    peak RSS (GB, its VmHWM from wait4: exact, the largest of it and the children it waited for) of one
    check in a fresh process."""
    command = [sys.executable, "-m", "lora_doctor", "check", str(adapter_dir), "--base", str(base_dir), "--plan", plan,
               "--dtype", "float32", "--prompts", str(prompts), "--json", str(report), "-q"]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=stderr)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                pss = tree_pss(child.pid)
                if pss is not None:  # a sample read while the tree changed is dropped
                    peak[0] = max(peak[0], pss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(1800, child.kill)  # no run waits forever
        timer.start()
        try:
            _pid, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
            done.set()
            sampler.join()
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):
            stderr.seek(0)
            sys.exit(f"check --plan {plan} on {base_dir.name} failed (exit {code}): {stderr.read().decode()[-2000:]}")
    return code, time.perf_counter() - started, peak[0] / 1e9, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def slope(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Added peak GB per added float32 GB of weights between two (float32 GB, peak GB) points."""
    return (b[1] - a[1]) / (b[0] - a[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x8,768x16,1024x20", help="hidden×layers of each model, smallest first")
    parser.add_argument("--plans", default="merged,swift-fixed")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the models in this folder and keep them")
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    if len(sizes) < 2:
        parser.error("--sizes: at least two models, to measure a slope")
    plans = args.plans.split(",")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="lora-doctor-model-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        models = []
        for hidden, layers in sizes:
            base_dir, adapter_dir, parameters = _build_apart(folder, hidden, layers)
            models.append((base_dir, adapter_dir, parameters))
            print(f"built {base_dir.name}: {parameters / 1e6:.0f}M parameters, {parameters * 4 / 1e9:.2f} GB in float32", flush=True)
        # A few of the bundled prompts: the memory does not depend on their number (docs/memory.md).
        prompts = folder / "prompts.jsonl"
        prompts.write_text("".join((FIXTURES / "prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]))
        rows: dict[tuple[str, str], list[tuple[float, float]]] = {(plan, kind): [] for plan in plans for kind in ("tree PSS", "VmHWM")}
        print(f"\n{'model':<16}{'params':>8}{'fp32 GB':>9}" + "".join(f"{plan + ' tree PSS':>24}{'VmHWM':>9}{'wall':>7}{'exit':>5}" for plan in plans))
        for base_dir, adapter_dir, parameters in models:
            line = f"{base_dir.name:<16}{parameters / 1e6:>7.0f}M{parameters * 4 / 1e9:>9.2f}"
            for plan in plans:
                code, wall, pss, hwm = run_check(base_dir, adapter_dir, plan, prompts, folder / f"report-{base_dir.name}-{plan}.json")
                rows[(plan, "tree PSS")].append((parameters * 4 / 1e9, pss))
                rows[(plan, "VmHWM")].append((parameters * 4 / 1e9, hwm))
                line += f"{pss:>21.2f} GB{hwm:>6.2f} GB{wall:>5.0f}s{code:>5}"
            print(line, flush=True)
        print(f"\npeak growth per added float32 GB (target ≤ {TARGET_SLOPE}×: the reference's and the engine's copies, then one module at a time)")
        for (plan, kind), points in rows.items():
            steps = ", ".join(f"{slope(a, b):.2f}×" for a, b in zip(points, points[1:]))
            overall = slope(points[0], points[-1])
            verdict = "ok" if overall <= TARGET_SLOPE else "ABOVE TARGET"
            print(f"  {plan:<12} {kind:<9} consecutive: {steps}; smallest→largest: {overall:.2f}× {verdict}")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def _build_apart(folder: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """Build in a process of its own, so the generator's memory is gone before any check runs."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.check_model_scale import build; from pathlib import Path; print(build(Path({str(folder)!r}), {hidden}, {layers})[2])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, **ENV), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"building the {hidden}x{layers} model failed: {out.stderr[-2000:]}")
    return folder / f"qwen2-{hidden}x{layers}", folder / f"lora-{hidden}x{layers}", int(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
