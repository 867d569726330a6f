"""The contract's corners no other test reaches, each on the real engine: what a phase could not
judge (a stale prefix cache the logits cannot see, or prompts that never reach the cache), a check
that is unresolved (exit 1), and the exit codes of an environment without vLLM or an engine that
cannot start (3) and of a crash of lora-doctor after the engine started (4).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, FIXTURES, ROOT, assert_one_line_error, run_cli, run_cli_process

pytestmark = pytest.mark.slow  # builds engines of its own (`make test-quick` leaves it out)

# A bf16 base and a LoRA with ‖ΔW‖/‖W0‖ ≈ 2e-3: in bf16 the logits cannot resolve it even behind the
# built-in prompts' long system prompt (DESIGN: signal/noise ≈ 2, the bar is 16).
SMALL_BF16 = FIXTURES / "checkpoint-500-2e-3"


@pytest.fixture(scope="module")
def small_bf16():
    from lora_doctor import Checker

    with Checker(SMALL_BF16, dtype="bfloat16") as checker:
        yield checker


def rendered(report) -> dict[str, str]:
    from rich.console import Console

    from lora_doctor.report import render_html, render_markdown, render_terminal

    console = Console(file=io.StringIO(), width=250)
    render_terminal(report, console)
    return {"terminal": console.file.getvalue(), "markdown": render_markdown(report), "html": render_html(report)}


def test_a_stale_cache_the_bf16_logits_cannot_see_is_reported_as_not_measured(small_bf16):
    from lora_doctor.report import render_json

    # A merged push without reset_prefix_cache(): the rollouts do read the old policy's KV blocks (the
    # prompts fill two blocks), but in bf16 a 2e-3 LoRA moves them by less than the run's noise.
    report = small_bf16.run("merged-no-cache-reset")
    assert report.resolution["logits_resolve"] is False
    assert report.engine["cache_exercised"] and report.engine["cache_blocks"] >= 2
    (phase,) = report.phases
    assert phase.verdict != "stale_cache"
    assert phase.decode_cache_blocks == report.engine["cache_blocks"]
    reason = phase.not_measured["stale_cache"]
    assert "cannot resolve this LoRA" in reason and "stale prefix cache" in reason
    for name, text in rendered(report).items():
        # Markdown escapes the underscore.
        assert re.search(r"stale\\?_cache not measured — the logits cannot resolve this LoRA", text), name
    assert json.loads(render_json(report))["phases"][0]["not_measured"]["stale_cache"] == reason


def test_prompts_shorter_than_a_kv_block_say_the_cache_was_not_judged(checker):
    # The session's engine on fixtures/prompts.jsonl: 13–15 tokens a prompt, under one 128-token block.
    report = checker.run("merged")
    assert report.engine["options"]["enable_prefix_caching"] and not report.engine["cache_exercised"]
    assert [phase.name for phase in report.phases] == ["full-merged", "full-merged"]
    for phase in report.phases:
        assert phase.verdict == "ok", phase.explanation
        assert phase.decode_cache_blocks == 0
        assert "128-token KV block" in phase.not_measured["stale_cache"]


def test_a_check_whose_logits_cannot_resolve_the_lora_and_reads_no_module_is_unresolved_exit_1(tmp_path):
    # `check`, not only `probe(module_read=False)`: bf16, the 2e-3 LoRA, --no-module-read. Nothing decides,
    # so the phase is unresolved (a measured problem, exit 1), never ok.
    out = tmp_path / "r.json"
    run = run_cli("check", SMALL_BF16, "--dtype", "bfloat16", "--plan", "merged", "--no-module-read", "--json", out)
    assert run.exit_code == 1, run.stderr
    report = json.loads(out.read_text())
    assert report["resolution"]["logits_resolve"] is False and report["verdict"] == "fail"
    assert [phase["name"] for phase in report["phases"]] == ["full-merged", "full-merged"]
    for phase in report["phases"]:
        assert phase["verdict"] == "unresolved" and phase["decided_by"] == "nothing", phase["explanation"]
        assert phase["layers"] == []
    assert "unresolved" in run.stdout and "--no-module-read" in run.stdout  # the cause names the fix


def test_without_an_importable_vllm_the_check_is_an_environment_problem(tmp_path):
    # The installed vLLM, first on the path with every file in place but an `__init__` that fails the
    # way a vLLM built against another torch or CUDA does: its source can be read, not imported.
    import importlib.util

    installed = Path(importlib.util.find_spec("vllm").origin).parent
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    for entry in installed.iterdir():
        if entry.name not in ("__init__.py", "__pycache__"):
            (site / "vllm" / entry.name).symlink_to(entry)
    (site / "vllm" / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    out = tmp_path / "r.json"
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    run = run_cli_process("check", CHECKPOINT, "--plan", "merged", "--json", out, env=env)
    line = assert_one_line_error(run, 3, "vLLM is not usable here (ImportError: libcuda.so.1", unwritten=out)
    assert "pip install" in line  # the hint to fix it
    named = re.search(r"\(engine log: (\S+)\)", line)
    if named:  # the log of the engine output so far (none: it never started), removed with it
        Path(named.group(1)).unlink()


def test_an_engine_whose_kv_cache_cannot_hold_a_block_fails_to_start_as_an_environment_problem(tmp_path):
    # One KV block for the whole engine: vLLM refuses to start ("No available memory for the cache
    # blocks"). A process of its own: a failed start in this process would share its parallel state.
    out = tmp_path / "r.json"
    run = run_cli_process("check", CHECKPOINT, "--plan", "merged", "--engine-option", "num_gpu_blocks_override=1", "--json", out)
    line = assert_one_line_error(run, 3, "the vLLM engine failed to start: No available memory for the cache blocks", unwritten=out)
    log = Path(re.search(r"\(engine log: (\S+)\)", line).group(1))
    assert log.is_file()
    log.unlink()


def test_a_crash_after_the_engine_started_is_exit_4_with_the_traceback_and_engine_log(tmp_path, monkeypatch):
    # lora-doctor's own measuring code failing the way a bug would, after the engine started and the
    # plan ran its first sync: the greedy-match figure of the first phase.
    import lora_doctor.measure.phase as phase_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(phase_module, "greedy_match", broken)
    out = tmp_path / "r.json"
    run = run_cli("check", CHECKPOINT, "--plan", "merged", "--json", out)
    line = assert_one_line_error(run, 4, "internal error: ZeroDivisionError", unwritten=out)
    saved = Path(re.search(r"traceback is in (\S+)", line).group(1))
    text = saved.read_text()
    # It failed while measuring a phase: after the engine was built and the plan had synced.
    assert "phase.py" in text and "in broken" in text
    log = Path(re.findall(r"engine log: (/\S+)", text)[-1])
    assert log.is_file() and log.stat().st_size > 0  # the engine ran and wrote its log
    saved.unlink()
    log.unlink()


def test_the_decode_path_names_stale_cache_or_decode_diverged_from_its_cache_free_repeat():
    # decode_diverged needs a generation path that differs from the prompt path with the cache
    # skipped. On vLLM's CPU build nothing found does that: an fp8 KV cache (kv_cache_dtype=fp8) moves
    # both paths alike (prompt KL 2.2e-2, decode 9.1e-3, under the run's own limit 0.18 measured on the
    # same engine); logprobs_mode=raw_logits changes the returned numbers, not the distribution (decode
    # KL 0). So the decision is checked here on real log-prob tables: a reference's, a fresh engine's
    # (float32 rounding away from it) and one computed from other logits (another policy's KV).
    from lora_doctor.measure.metrics import kl_per_token
    from lora_doctor.measure.verdict import decode_verdict

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 704, generator=generator, dtype=torch.float64)
    reference = torch.log_softmax(logits, dim=-1)
    fresh = torch.log_softmax(logits.float(), dim=-1)
    other = torch.log_softmax(logits + 0.3 * torch.randn(8, 704, generator=generator, dtype=torch.float64), dim=-1).float()
    fresh_kl, other_kl = float(kl_per_token(reference, fresh).mean()), float(kl_per_token(reference, other).mean())
    kl_limit = 1.7e-6  # a float32 check's limit on the bundled fixture
    assert fresh_kl < kl_limit < other_kl
    assert decode_verdict(fresh_kl, fresh_kl, kl_limit) == "ok"
    assert decode_verdict(other_kl, fresh_kl, kl_limit) == "stale_cache"  # without the cache it agrees
    assert decode_verdict(other_kl, other_kl, kl_limit) == "decode_diverged"  # without the cache it does not
    assert decode_verdict(other_kl, kl_limit, kl_limit) == "stale_cache"  # at the limit is within it
