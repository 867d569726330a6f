"""Chunked, streamed logit figures on the real engine: equal to the whole-set ones, with a scale fit
that stays within ±0.01 in at most 8 reference forwards per phase."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from conftest import BASE, CHECKPOINT, ROOT, run_cli

from lora_doctor.engine.driver import _dense_prompt_logprobs
from lora_doctor.measure.logit_pass import measure_logits, prompt_chunks
from lora_doctor.plans.builtin import get_plan
from lora_doctor.plans.sync import Sync

# Both sides are float32 on CPU: the same numbers, summed in another order.
KL_TOLERANCE = dict(rel=1e-4, abs=1e-9)


def synced(checker, scale: float, adapter: bool = False):
    """Put the shared engine in a known state (merged at `scale`, or base + adapter); its request.
    A sync handle driven directly: a plan must probe, and these tests measure the state themselves."""
    sync = Sync(checker.engine, checker.checkpoint, checker.reference, checker._measure, checker.previous)
    if adapter:
        sync.load_merged(scale=1.0)
        sync.add_adapter()
    else:
        sync.load_merged(scale=scale)
    return sync.lora_request


def measure(checker, request, chunk_positions: int):
    m = checker.measurer
    return measure_logits(
        m.reference, checker.engine, m.token_ids, request, scale_range=m.scale_range, chunk_positions=chunk_positions
    )


def test_prompts_are_chunked_by_positions_and_never_split():
    token_ids = [[1] * 11, [1] * 6, [1] * 31, [1] * 2]  # 10, 5, 30 and 1 scored positions
    assert prompt_chunks(token_ids, 16) == [[0, 1], [2], [3]]
    assert prompt_chunks(token_ids, 1000) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("adapter", [False, True], ids=["merged", "adapter"])
def test_worker_side_tables_equal_vllms_own_full_vocabulary_output(checker, adapter):
    request = synced(checker, 1.0, adapter=adapter)
    prompts = checker.measurer.token_ids
    captured = checker.engine.prompt_logprobs(prompts, request)
    outputs = checker.engine._prompt_requests(prompts, -1, request, batch=True)
    own = [_dense_prompt_logprobs(o.prompt_logprobs, checker.engine.vocab_size) for o in outputs]
    assert [t.shape for t in captured] == [(len(ids) - 1, checker.engine.vocab_size) for ids in prompts]
    for mine, theirs in zip(captured, own, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("adapter", [False, True], ids=["merged", "adapter"])
def test_a_batch_of_rollouts_captured_on_the_worker_equals_vllms_own_full_vocabulary_output(checker, adapter):
    from vllm import SamplingParams

    from lora_doctor.engine.driver import _dense_logprobs

    request = synced(checker, 1.0, adapter=adapter)
    engine, prompts = checker.engine, checker.measurer.token_ids
    engine.reset_prefix_cache()
    batched = engine._captured_decode_batch(prompts, 8, request, skip_cache=False)
    assert batched is not None  # every row told apart: the fixture's prompts generate distinct log-probs
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=-1, flat_logprobs=True, detokenize=False)
    own = [(list(o.outputs[0].token_ids), _dense_logprobs(o.outputs[0].logprobs, engine.vocab_size)) for o in engine._generate(prompts, params, request)]
    assert len(batched) == len(prompts) and sum(len(tokens) for tokens, _ in batched) > len(prompts)
    for (tokens, table), (their_tokens, their_table) in zip(batched, own, strict=True):
        assert tokens == their_tokens
        assert torch.equal(table, their_table)


@pytest.mark.parametrize(("scale", "adapter"), [(0.75, False), (1.0, True)], ids=["merged-0.75", "double-counted"])
def test_chunked_streamed_figures_equal_the_whole_set(checker, scale, adapter):
    request = synced(checker, scale, adapter=adapter)
    whole = measure(checker, request, chunk_positions=10_000)
    # A few positions per chunk: every prompt its own chunk, the engine's tables read back from disk.
    chunked = measure(checker, request, chunk_positions=8)
    assert len(prompt_chunks(checker.measurer.token_ids, 8)) == len(checker.measurer.token_ids) > 1
    assert chunked.comparison.kl_mean == pytest.approx(whole.comparison.kl_mean, **KL_TOLERANCE)
    assert chunked.comparison.kl_max == pytest.approx(whole.comparison.kl_max, **KL_TOLERANCE)
    assert chunked.comparison.top1_agreement == whole.comparison.top1_agreement
    for a, b in zip(chunked.comparison.kl_per_token, whole.comparison.kl_per_token, strict=True):
        assert a == pytest.approx(b, **KL_TOLERANCE)
    assert chunked.fit.scale == pytest.approx(whole.fit.scale, abs=1e-4)
    assert chunked.fit.kl == pytest.approx(whole.fit.kl, **KL_TOLERANCE)
    for alpha in (0.0, 1.0, 2.0):
        assert chunked.kl_at[alpha] == pytest.approx(whole.kl_at[alpha], **KL_TOLERANCE)
    for alpha in (0.0, 2.0):
        assert chunked.reference_kl[alpha] == pytest.approx(whole.reference_kl[alpha], **KL_TOLERANCE)
    assert chunked.fit.scale == pytest.approx(2.0 if adapter else scale, abs=0.01)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, 0.5, 1.25])
def test_scale_fit_within_a_hundredth_in_at_most_eight_reference_forwards(checker, scale):
    request = synced(checker, scale)
    reference = checker.measurer.reference
    forwards = []  # the α of every pass of the reference over the prompts (each begins at the first)
    own, first = reference.prompt_logprobs, checker.measurer.token_ids[0]

    def counted(prompts, alpha=1.0, adapter=None):
        if prompts[0] == first:
            forwards.append(alpha)
        return own(prompts, alpha, adapter)

    reference.prompt_logprobs = counted
    try:
        figures = measure(checker, request, chunk_positions=10_000)
    finally:
        del reference.prompt_logprobs
    assert figures.fit.scale == pytest.approx(scale, abs=0.01)
    assert not figures.fit.at_edge
    assert len(forwards) <= 8
    if scale in (0.0, 1.0, 2.0):
        assert forwards == [0.0, 1.0, 2.0]  # the nodes answer: no forward spent on the fit


@pytest.mark.parametrize(
    ("function", "scale"),
    [("merged_at_1_5", 1.5), ("merged_at_sqrt_r", math.sqrt(8)), ("merged_at_3_5", 3.5), ("merged_at_minus_half", -0.5)],
)
def test_scale_fit_off_the_nodes_within_a_hundredth_in_at_most_eight_forwards(checker, monkeypatch, function, scale):
    check = importlib.import_module("lora_doctor.measure.phase")

    reference = checker.measurer.reference
    own, own_measure = reference.prompt_logprobs, check.measure_logits
    first = checker.measurer.token_ids[0]
    passes = []  # per logit pass: the α of every reference pass over the prompts (of the current LoRA), and the figures

    def counted(prompts, alpha=1.0, adapter=None):
        if adapter is None and prompts[0] == first:
            passes[-1][0].append(alpha)
        return own(prompts, alpha, adapter)

    def measured(*args, **kwargs):
        passes.append(([], None))
        figures = own_measure(*args, **kwargs)
        passes[-1] = (passes[-1][0], figures)
        return figures

    monkeypatch.setattr(reference, "prompt_logprobs", counted)
    monkeypatch.setattr(check, "measure_logits", measured)
    (phase,) = checker.run(get_plan(f"{ROOT / 'tests' / 'scale_plans.py'}:{function}")).phases
    forwards, figures = passes[-1]  # the phase's pass (a first run also measures the noise before it)
    assert figures.fit.scale == pytest.approx(scale, abs=0.01)
    assert not figures.fit.at_edge
    assert phase.effective_scale == figures.fit.scale
    assert len(forwards) <= 8
    assert forwards[:3] == [0.0, 1.0, 2.0]


def test_kl_directions_agree_between_mean_kl_and_kl_at_scale(checker):
    request = synced(checker, 1.0, adapter=True)
    figures = measure(checker, request, chunk_positions=10_000)
    # One direction, KL(reference ‖ engine): the mean at α = 1 is the fit objective's value there.
    assert figures.kl_at[1.0] == pytest.approx(figures.comparison.kl_mean, **KL_TOLERANCE)


def test_prompt_longer_than_the_model_is_refused_before_anything_loads(tmp_path):
    config = json.loads((BASE / "config.json").read_text())
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "one two three " * config["max_position_embeddings"]}) + "\n")
    report = tmp_path / "r.json"
    run = run_cli("check", CHECKPOINT, "--prompts", prompts, "--json", report)
    assert run.exit_code == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "prompt 1 has" in lines[0] and "shorten it" in lines[0]
    assert "loading the reference" not in run.stderr
    assert not report.exists()


def _vllm_output(ids, table):
    """A request output as vLLM builds it with prompt_logprobs=0: each prompt token's own log-prob."""
    from types import SimpleNamespace

    from vllm.logprobs import FlatLogprobs, Logprob

    flat = FlatLogprobs()
    flat.append(None)
    for row, token in enumerate(ids[1:]):
        flat.append({token: Logprob(float(table[row, token]), rank=1)})
    return SimpleNamespace(prompt_logprobs=flat)


def test_captured_chunks_are_split_per_prompt_and_checked_against_vllms_own_values():
    from lora_doctor.engine.driver import _captured_tables

    torch.manual_seed(0)
    prompts = [[5, 1, 2, 3, 4], [6, 7, 8]]
    tables = [torch.log_softmax(torch.randn(len(ids) - 1, 10), -1) for ids in prompts]
    outputs = [_vllm_output(ids, table) for ids, table in zip(prompts, tables, strict=True)]
    targets = [torch.tensor(ids[1:]) for ids in prompts]
    # The first prompt prefilled in two chunks, then the second: reassembled per prompt.
    captured = [(targets[0][:3], tables[0][:3]), (targets[0][3:], tables[0][3:]), (targets[1], tables[1])]
    assembled = _captured_tables(captured, prompts, outputs, 10)
    assert all(torch.equal(a, b) for a, b in zip(assembled, tables, strict=True))
    # Out of order, a chunk missing, a chunk too many, or rows that are not the engine's own: None.
    assert _captured_tables(captured[::-1], prompts, outputs, 10) is None
    assert _captured_tables(captured[:2], prompts, outputs, 10) is None
    assert _captured_tables(captured + captured[-1:], prompts, outputs, 10) is None
    shifted = [(t, x + 1e-3) for t, x in captured]
    assert _captured_tables(shifted, prompts, outputs, 10) is None


def test_fit_steps_on_a_sample_of_the_prompts_find_the_same_scale(checker, monkeypatch):
    import lora_doctor.measure.logit_pass as logit_pass

    request = synced(checker, 0.75)
    whole = measure(checker, request, chunk_positions=10_000)
    # Steps on the first prompts only (≥ 20 positions, the tangent on 10 rows), the end point judged on
    # the first ≥ 40.
    monkeypatch.setattr(logit_pass, "FIT_SAMPLE_POSITIONS", 20)
    monkeypatch.setattr(logit_pass, "TANGENT_POSITIONS", 10)
    monkeypatch.setattr(logit_pass, "FIT_CHECK_POSITIONS", 40)
    sampled = measure(checker, request, chunk_positions=10_000)
    sampled_chunked = measure(checker, request, chunk_positions=8)
    assert sampled.fit.scale == pytest.approx(0.75, abs=0.01)
    assert sampled.fit.scale == pytest.approx(whole.fit.scale, abs=0.01)
    # The sample is whole prompts in order, whatever the chunking.
    assert sampled_chunked.fit.scale == pytest.approx(sampled.fit.scale, abs=1e-4)
    assert sampled.kl_at == pytest.approx(whole.kl_at, **KL_TOLERANCE)
    # Engine and reference at 0.75 differ by rounding alone, on any prompts.
    assert sampled.fit.kl < 1e-2 * sampled.kl_at[1.0]
