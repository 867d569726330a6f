"""The audit's compiled bf16 pass against the same sums written with torch operations in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lora_doctor.adapter.lora_delta import merge_in_dtype
from lora_doctor.export_audit.bf16_sums import bf16_sums


def torch_sums(merged: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> list[float]:
    expected = merge_in_dtype(base, delta, torch.bfloat16).double()
    e = merged.double() - expected
    kept = expected - base.double()
    x, w0 = delta.double(), base.double()
    return [float((a * b).sum()) for a, b in ((e, e), (e, kept), (e, x), (kept, kept), (kept, x), (x, x), (w0, w0))]


def weights(rows: int = 300, cols: int = 257, ratio: float = 1e-2, base_dtype=torch.bfloat16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=generator) * 0.02).to(base_dtype)
    delta = torch.randn(rows, cols, generator=generator) * 0.02 * ratio
    return base, delta


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("times", [0, 1, 2, 3])
@pytest.mark.parametrize("ratio", [1e-2, 2e-3, 1.0])
def test_matches_torch(base_dtype, times, ratio):
    base, delta = weights(ratio=ratio, base_dtype=base_dtype)
    merged = base.to(torch.bfloat16)
    for _ in range(times):
        merged = merge_in_dtype(merged, delta, torch.bfloat16)
    got, want = bf16_sums(merged, base, delta), torch_sums(merged, base, delta)
    scale = max(abs(value) for value in want[:6])  # ‖W0‖², far larger, is held to its own size
    for a, b in zip(got[:6], want[:6]):
        assert abs(a - b) <= 1e-6 * scale, (got, want)
    assert got[6] == pytest.approx(want[6], rel=1e-6)
    if times == 1 and base_dtype == torch.bfloat16:
        assert got[:3] == (0.0, 0.0, 0.0)  # PEFT's merge in bf16 is the expectation, bit for bit


def test_rounding_ties_to_even():
    # ΔW exactly half an ulp of W0 = 1.0 (ulp 2^-7): the tie rounds to the even neighbour, 1.0, as torch does.
    base = torch.ones(4, 4, dtype=torch.bfloat16)
    delta = torch.full((4, 4), 2.0**-8)
    merged = merge_in_dtype(base, delta, torch.bfloat16)
    assert torch.equal(merged, base)
    assert bf16_sums(merged, base, delta)[3] == 0.0  # nothing of ΔW is kept
    delta = torch.full((4, 4), 3 * 2.0**-8)  # 1.5 ulp: a tie rounding up to 1 + 2^-6
    assert bf16_sums(merge_in_dtype(base, delta, torch.bfloat16), base, delta)[3] == pytest.approx(16 * 2.0**-12)


def test_many_blocks_keep_the_residual():
    # A double merge's residual is a difference of sums ~1e-3 apart: float32 totals over ~4M elements lose it.
    base, delta = weights(rows=2048, cols=2048)
    twice = merge_in_dtype(merge_in_dtype(base, delta, torch.bfloat16), delta, torch.bfloat16)
    (ee, e_kept, _, kept, _, _, _), want = bf16_sums(twice, base, delta), torch_sums(twice, base, delta)
    residual = ee - 2 * e_kept + kept  # ‖e − D‖²
    assert residual == pytest.approx(want[0] - 2 * want[1] + want[3], rel=1e-3)


def test_nan_reaches_the_sums():
    base, delta = weights()
    merged = merge_in_dtype(base, delta, torch.bfloat16)
    merged[3, 5] = float("nan")
    assert math.isnan(bf16_sums(merged, base, delta)[0])


def test_rejects_other_dtypes():
    base, delta = weights()
    with pytest.raises(TypeError):
        bf16_sums(base.float(), base, delta)
    with pytest.raises(ValueError):
        bf16_sums(base, base, delta[:10])


@pytest.mark.slow
def test_a_vllm_engine_starts_in_a_process_that_ran_the_compiled_pass():
    """vLLM scans every loaded module at start-up and tripped over numba's llvmlite (lora_doctor.engine.compat):
    an audit, then a check, in one fresh process."""
    import sys

    from conftest import BASE, subprocess_env
    from processes import run_process

    script = (
        "import torch\n"
        "from lora_doctor.export_audit.bf16_sums import bf16_sums\n"
        "x = torch.zeros(4, 4)\n"
        "bf16_sums(x.to(torch.bfloat16), x.to(torch.bfloat16), x)\n"
        "from lora_doctor.engine.driver import Engine, EngineConfig\n"
        f"engine = Engine({str(BASE)!r}, EngineConfig(max_model_len=64))\n"
        "print('vocab', engine.vocab_size)\n"
        "engine.close()\n"
    )
    done = run_process([sys.executable, "-c", script], env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vocab" in done.stdout


def test_widen_in_python_matches_torch():
    from lora_doctor.export_audit.bf16_sums import _widen

    values = torch.tensor([1.0, -2.5, 3.140625, 1e-30], dtype=torch.bfloat16)
    for value, bits in zip(values.float().tolist(), values.view(torch.uint16).tolist(), strict=True):
        assert _widen(bits) == value
        assert _widen(value) == value
