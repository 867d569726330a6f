"""Bad input exits 2 with one line that says what is wrong, no traceback, and writes nothing.

The first case runs the CLI as a process of its own (the exit code as a shell sees it); the rest run
its `main` in this process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import BASE, CHECKPOINT, assert_one_line_error, run_cli, run_cli_process


def assert_one_line_exit_2(run, report: Path, needle: str) -> None:
    assert_one_line_error(run, 2, needle, unwritten=report)


@pytest.fixture
def wrong_base(tmp_path: Path) -> Path:
    """A real Qwen2 model whose projections are twice as wide as the fixture's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config.from_pretrained(BASE)
    config.hidden_size *= 2
    config.num_attention_heads *= 2
    config.num_key_value_heads *= 2
    torch.manual_seed(0)
    path = tmp_path / "wrong-base"
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def corrupt_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint-corrupt"
    shutil.copytree(CHECKPOINT, path)
    (path / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    return path


def test_missing_path(tmp_path):
    run = run_cli_process("check", tmp_path / "does-not-exist", "--json", tmp_path / "r.json")
    assert_one_line_exit_2(run, tmp_path / "r.json", "no such path")


def test_folder_without_adapter(tmp_path):
    run = run_cli("check", BASE, "--json", tmp_path / "r.json")
    assert_one_line_exit_2(run, tmp_path / "r.json", "adapter_config.json")


def test_corrupt_adapter_weights(tmp_path, corrupt_checkpoint):
    run = run_cli("check", corrupt_checkpoint, "--base", BASE, "--json", tmp_path / "r.json")
    assert_one_line_exit_2(run, tmp_path / "r.json", "not a readable safetensors file")


def test_base_that_does_not_fit_the_adapter(tmp_path, wrong_base):
    run = run_cli("check", CHECKPOINT, "--base", wrong_base, "--json", tmp_path / "r.json")
    assert_one_line_exit_2(run, tmp_path / "r.json", "does not fit base")


def test_unknown_plan(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", "no-such-plan", "--json", tmp_path / "r.json")
    assert_one_line_exit_2(run, tmp_path / "r.json", "unknown plan")


def test_json_into_a_missing_folder(tmp_path):
    run = run_cli("check", CHECKPOINT, "--json", tmp_path / "nowhere" / "r.json")
    assert_one_line_exit_2(run, tmp_path / "nowhere" / "r.json", "does not exist")


def test_unknown_threshold(tmp_path):
    run = run_cli("check", CHECKPOINT, "--threshold", "kl_meen=1", "--json", tmp_path / "r.json")
    assert_one_line_exit_2(run, tmp_path / "r.json", "unknown threshold")


def test_existing_report_is_not_overwritten_on_bad_input(tmp_path):
    report = tmp_path / "r.json"
    report.write_text("previous")
    run = run_cli("check", tmp_path / "does-not-exist", "--json", report)
    assert run.exit_code == 2
    assert report.read_text() == "previous"
