"""Unit tests of the pure math: KL, agreement and the effective-scale fit, on synthetic data."""

import math

import pytest
import torch

from lora_doctor.metrics import compare_logprobs, fit_scale, greedy_match, kl_per_token, mean_kl


def test_kl_of_identical_distributions_is_zero():
    logp = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), dim=-1)
    assert kl_per_token(logp, logp).abs().max() == 0


def test_kl_matches_the_closed_form_for_two_outcomes():
    p, q = 0.8, 0.5
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    logp = torch.log(torch.tensor([[p, 1 - p]], dtype=torch.float64))
    logq = torch.log(torch.tensor([[q, 1 - q]], dtype=torch.float64))
    assert kl_per_token(logp, logq).item() == pytest.approx(expected, rel=1e-12)


def test_kl_ignores_outcomes_the_reference_never_takes():
    logp = torch.log(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    logq = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert kl_per_token(logp, logq).item() == pytest.approx(math.log(2), rel=1e-12)


def test_compare_logprobs_reports_mean_max_and_top1():
    ref = [torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))]
    eng = [torch.log(torch.tensor([[0.9, 0.1], [0.3, 0.7]]))]
    result = compare_logprobs(ref, eng)
    second = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7)
    assert result.kl_max == pytest.approx(second, rel=1e-6)
    assert result.kl_mean == pytest.approx(second / 2, rel=1e-6)
    assert result.top1_agreement == 0.5
    assert len(result.kl_per_token[0]) == 2


def test_fit_scale_finds_the_minimum_of_a_smooth_objective():
    fit = fit_scale(lambda s: (s - 1.37) ** 2 + 0.25)
    assert fit.scale == pytest.approx(1.37, abs=1e-3)
    assert fit.kl == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("true_scale", [0.0, 1.0, 2.0, 1.4142])
def test_fit_scale_recovers_the_scale_of_a_linear_logit_family(true_scale):
    # Logits of a toy "model": base + s·delta, the way a LoRA scale moves pre-softmax activations.
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, 17, generator=generator, dtype=torch.float64)
    delta = torch.randn(40, 17, generator=generator, dtype=torch.float64)
    at = lambda s: [torch.log_softmax(base + s * delta, dim=-1)]  # noqa: E731
    engine = at(true_scale)
    fit = fit_scale(lambda s: mean_kl(engine, at(s)))
    assert fit.scale == pytest.approx(true_scale, abs=2e-3)
    assert fit.kl < 1e-6


def test_greedy_match_is_the_fraction_of_identical_continuations():
    assert greedy_match([[1, 2], [3], [4]], [[1, 2], [3, 5], [4]]) == pytest.approx(2 / 3)
