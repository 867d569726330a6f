#!/usr/bin/env python
"""How fast `lora-doctor audit` reads a multi-GB merged export, next to a plain read of the same files.

Builds under a temporary folder a synthetic model with Qwen2-1.5B's shapes (28 layers, hidden 1536,
intermediate 8960, vocabulary 151,936, tied embeddings, random bf16 weights, ~3.1 GB), sharded like
`save_pretrained` does; a rank-16 LoRA on the seven projections with ‖ΔW‖/‖W0‖ = 1e-2; and the
correct bf16 merge of the two (sharded too). Then, twice — with the files in the page cache (warm)
and after dropping these files from it with posix_fadvise (cold) — it times a plain sequential read
of the export and the base and the audit, `--repeat` times each (pairs in turn; the medians are the figures) (`lora-doctor audit` in a child process), and prints the
throughput of each in GB/s and the audit's peak RSS. Everything is deleted afterwards.

    python bench/audit_speed.py [--layers 28] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 1536, 8960, 151936, 12, 2
HEAD_DIM = HIDDEN // HEADS
RANK, ALPHA = 16, 32
DELTA_RATIO = 1e-2  # ‖ΔW‖ / ‖W0‖ of a real fine-tune's LoRA
SHARD_BYTES = 1 << 30  # save_pretrained's shards are a few GB; 1 GB gives several shards here
TARGETS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
READ_BYTES = 8 << 20


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name, shape in TARGETS.items():
            shapes[f"{prefix}{name}.weight"] = shape
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{prefix}self_attn.{name}.bias"] = (TARGETS[f"self_attn.{name}"][0],)
        shapes[f"{prefix}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def build(folder: Path, layers: int) -> tuple[Path, Path, Path]:
    """Base, adapter and merged export, written shard by shard (a shard of each in memory at a time)."""
    base, export, adapter = folder / "base", folder / "export", folder / "adapter"
    for path in (base, export, adapter):
        path.mkdir()
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }
    for path in (base, export):
        (path / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    lora: dict[str, torch.Tensor] = {}
    base_part: dict[str, torch.Tensor] = {}
    export_part: dict[str, torch.Tensor] = {}
    shard = 0
    for name, shape in tensor_shapes(layers).items():
        w0 = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        merged = w0
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".", 3)[-1] in TARGETS:
            a = torch.randn(RANK, shape[1], generator=generator)
            b = torch.randn(shape[0], RANK, generator=generator)
            scaling = ALPHA / RANK
            b *= DELTA_RATIO * w0.float().norm() / (b @ a * scaling).norm()
            lora[f"base_model.model.{module}.lora_A.weight"] = a
            lora[f"base_model.model.{module}.lora_B.weight"] = b
            merged = w0 + (b @ a * scaling).to(torch.bfloat16)  # PEFT's merge of a bf16 model
        if base_part and sum(t.numel() * 2 for t in base_part.values()) + w0.numel() * 2 > SHARD_BYTES:
            shard += 1
            _write_shard(shard, base_part, export_part, base, export)
        base_part[name], export_part[name] = w0, merged
    _write_shard(shard + 1, base_part, export_part, base, export)
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": [k.split(".")[-1] for k in TARGETS],
        "base_model_name_or_path": str(base), "fan_in_fan_out": False, "use_rslora": False,
    }))
    for path in (base, export):
        _write_index(path)
    return base, export, adapter


def _write_shard(number: int, base_part: dict, export_part: dict, base: Path, export: Path) -> None:
    save_file(base_part, str(base / f"part-{number:05d}.safetensors"), metadata={"format": "pt"})
    save_file(export_part, str(export / f"part-{number:05d}.safetensors"), metadata={"format": "pt"})
    base_part.clear()
    export_part.clear()


def _write_index(folder: Path) -> None:
    from safetensors import safe_open

    weight_map = {}
    for file in sorted(folder.glob("part-*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            weight_map.update({key: file.name for key in handle.keys()})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def weight_files(*folders: Path) -> list[Path]:
    return sorted(f for folder in folders for f in folder.glob("*.safetensors"))


def drop_from_page_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(files: list[Path]) -> float:
    """Seconds to read every file front to back into one reused buffer."""
    buffer = memoryview(bytearray(READ_BYTES))
    started = time.perf_counter()
    for file in files:
        with file.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def run_audit(export: Path, adapter: Path, report: Path) -> tuple[float, int, dict]:
    """Seconds, peak RSS (bytes) and JSON report of `lora-doctor audit` in a child process.

    The peak is the child's own VmHWM, read as it exits: a forked child's ru_maxrss starts from its
    parent's RSS, which here is the builder's.
    """
    peak_file = report.with_suffix(".vmhwm")
    wrapper = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(peak_file)!r}, 'w').write("
        "next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))))\n"
        f"sys.argv = ['lora-doctor', 'audit', {str(export)!r}, '--adapter', {str(adapter)!r}, '--json', {str(report)!r}, '-q']\n"
        "from lora_doctor.cli import main\n"
        "main()\n"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"audit failed with exit code {done.returncode}")
    peak_kib = int(peak_file.read_text().split()[1])
    return seconds, peak_kib * 1024, json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (Qwen2-1.5B: 28)")
    parser.add_argument("--repeat", type=int, default=3, help="plain read + audit pairs per cache state (a disk's speed varies by ±30%% here)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to build the model (deleted afterwards)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lora-doctor-audit-bench-", dir=args.dir))
    try:
        started = time.perf_counter()
        base, export, adapter = build(folder, args.layers)
        files = weight_files(export, base)
        total = sum(f.stat().st_size for f in files)
        largest = max(math.prod(shape) * 2 for shape in tensor_shapes(args.layers).values())
        print(f"built in {time.perf_counter() - started:.0f} s: export + base {total / 1e9:.2f} GB in {len(files)} files "
              f"({args.layers} layers, Qwen2-1.5B shapes, bf16), largest tensor {largest / 1e6:.0f} MB")
        limit = 2 * largest + 500e6
        print(f"{'cache':5s} {'plain read':>14s} {'audit':>14s} {'audit/plain':>11s} {'audit peak RSS':>15s}  verdict")
        ratios: dict[str, list[float]] = {"warm": [], "cold": []}
        for run in range(args.repeat):
            for cache in ("warm", "cold"):
                if cache == "warm":
                    plain_read(files)  # fill the page cache with both folders
                else:
                    drop_from_page_cache(files)
                plain = plain_read(files)
                if cache == "cold":
                    drop_from_page_cache(files)
                seconds, rss, report = run_audit(export, adapter, folder / "report.json")
                audit_seconds = report["seconds"]["audit"]
                ratios[cache].append(plain / audit_seconds)
                print(f"{cache:5s} {total / plain / 1e9:9.2f} GB/s {total / audit_seconds / 1e9:9.2f} GB/s "
                      f"{plain / audit_seconds:10.0%} {rss / 1e9:12.2f} GB  {report['phases'][0]['verdict']} "
                      f"(audit {audit_seconds:.1f} s inside a {seconds:.1f} s process; run {run + 1})")
        for cache, values in ratios.items():
            print(f"{cache}: audit/plain median {statistics.median(values):.0%} over {len(values)} runs "
                  f"(from {min(values):.0%} to {max(values):.0%}; each pair read in turn, so both see the same disk)")
        print(f"targets: audit ≥ 70% of the plain read's throughput; peak RSS ≤ 2 × largest tensor + 500 MB = {limit / 1e9:.2f} GB")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
