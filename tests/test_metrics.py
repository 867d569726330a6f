"""Unit tests of the pure math: KL, agreement and the effective-scale fit, on synthetic data."""

import math

import pytest
import torch

from lora_doctor.measure.metrics import (
    SLOPE_STEP,
    Node,
    NodeTally,
    compare_logprobs,
    fit_scale,
    greedy_match,
    kl_per_token,
    mean_kl,
    node_slope,
    tangent_minimum,
)


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


def _linear_family(rows: int = 40, vocab: int = 17):
    # Logits of a toy "model": base + s·delta, the way a LoRA scale moves pre-softmax activations.
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    delta = torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    return lambda s: torch.log_softmax(base + s * delta, dim=-1)


def _fit(at, engine, low=-1.0, high=4.0):
    """The fit as a phase runs it: nodes from the tables at 0, 1, 2, then measured steps."""
    tables = [at(alpha) for alpha in (0.0, 1.0, 2.0)]
    nodes = {}
    for alpha, own in zip((0.0, 1.0, 2.0), tables):
        tally = NodeTally()
        tally.add(engine, own, node_slope(alpha, tables))
        nodes[alpha] = tally.node()
    calls = []

    def measure(alpha):
        calls.append(alpha)
        tally = NodeTally()
        tally.add(engine, at(alpha), (at(alpha + SLOPE_STEP) - at(alpha)) / SLOPE_STEP)
        return tally.node()

    def kl_at(alpha):
        calls.append(alpha)
        return mean_kl([at(alpha)], [engine])

    return fit_scale(measure, kl_at, low, high, nodes), calls


@pytest.mark.parametrize("true_scale", [0.0, 1.0, 2.0])
def test_a_scale_on_a_node_needs_no_further_forward(true_scale):
    at = _linear_family()
    fit, calls = _fit(at, at(true_scale))
    assert calls == []
    assert fit.scale == true_scale
    assert fit.kl < 1e-12
    assert not fit.at_edge


@pytest.mark.parametrize("true_scale", [0.25, 0.5, 1.4142, 2.8284, -0.5])
def test_fit_scale_recovers_the_scale_of_a_linear_logit_family(true_scale):
    at = _linear_family()
    fit, calls = _fit(at, at(true_scale))
    assert fit.scale == pytest.approx(true_scale, abs=1e-2)
    # Two measured steps (two forwards each) and one check: at most 8 forwards with the nodes.
    assert len(calls) <= 3
    assert not fit.at_edge


def test_a_scale_beyond_the_range_is_flagged_at_its_edge():
    at = _linear_family()
    fit, _calls = _fit(at, at(3.0), high=2.5)
    assert fit.scale == pytest.approx(2.5)
    assert fit.at_edge


def test_node_slope_and_curvature_match_finite_differences_of_the_objective():
    at = _linear_family()
    engine = at(1.3)
    tally = NodeTally()
    tally.add(engine, at(0.8), (at(0.8 + 1e-6) - at(0.8 - 1e-6)) / 2e-6)
    h = 1e-4
    numeric = (mean_kl([at(0.8 + h)], [engine]) - mean_kl([at(0.8 - h)], [engine])) / (2 * h)
    assert tally.node().slope == pytest.approx(numeric, rel=1e-5)
    assert tally.node().kl == pytest.approx(mean_kl([at(0.8)], [engine]), rel=1e-12)
    # Gauss-Newton curvature: the objective's own second derivative where the engine is matched.
    matched = NodeTally()
    matched.add(engine, at(1.3), (at(1.3 + 1e-6) - at(1.3 - 1e-6)) / 2e-6)
    second = (mean_kl([at(1.3 + h)], [engine]) - 2 * mean_kl([at(1.3)], [engine]) + mean_kl([at(1.3 - h)], [engine])) / h**2
    assert matched.node().curvature == pytest.approx(second, rel=1e-3)


def test_second_derivative_along_the_tangent_matches_finite_differences_away_from_the_minimum():
    at = _linear_family()
    engine = at(1.3)
    # Away from the minimum Gauss-Newton misses KL's asymmetry; the tangent's second derivative
    # does not (for logits linear in α the tangent is the family itself).
    tally = NodeTally(higher=True)
    tally.add(engine, at(0.6), (at(0.6 + 1e-6) - at(0.6 - 1e-6)) / 2e-6)
    h = 1e-4
    second = (mean_kl([at(0.6 + h)], [engine]) - 2 * mean_kl([at(0.6)], [engine]) + mean_kl([at(0.6 - h)], [engine])) / h**2
    assert tally.node().second == pytest.approx(second, rel=1e-3)
    assert abs(tally.node().curvature - second) > 0.05 * second


@pytest.mark.parametrize(("start", "true_scale"), [(0.3, 2.8284), (3.0, 3.5), (-1.0, -0.5), (2.0, 0.25)])
def test_the_tangent_minimum_is_exact_for_logits_linear_in_the_scale(start, true_scale):
    at = _linear_family()
    engine = at(true_scale)
    own = at(start)
    slope = (at(start + 1e-6) - at(start - 1e-6)) / 2e-6
    step = tangent_minimum([(engine, own, slope)], -1.0 - start, 4.0 - start)
    assert start + step == pytest.approx(true_scale, abs=1e-3)
    # Bounded by the searched range.
    assert tangent_minimum([(engine, own, slope)], -0.1, 0.1) == pytest.approx(0.1 if true_scale > start else -0.1)


def test_kl_per_token_in_float32_blocks_matches_float64():
    # 300 rows of a 50,000-entry vocabulary: several row blocks, as for a real vocabulary.
    generator = torch.Generator().manual_seed(1)
    p = torch.log_softmax(torch.randn(300, 50_000, generator=generator) * 3, dim=-1)
    q = torch.log_softmax(p + 0.05 * torch.randn(300, 50_000, generator=generator), dim=-1)
    exact = (p.double().exp() * (p.double() - q.double())).sum(-1)
    assert torch.allclose(kl_per_token(p, q), exact, rtol=1e-4, atol=1e-9)


def test_greedy_match_is_the_fraction_of_identical_continuations():
    assert greedy_match([[1, 2], [3], [4]], [[1, 2], [3, 5], [4]]) == pytest.approx(2 / 3)


def test_where_the_outward_step_is_worse_the_fit_takes_the_nodes_own_step():
    # The nodes measured on the Llama rsLoRA fixture with the built-in prompts, an engine at α = 0.25:
    # the KL parabola through the nodes still falls past α = 0, which sends the first step outwards,
    # where the objective has a second, shallower basin (KL 0.86 at α = -0.37). The α = 0 node's own
    # model points inwards; once the outward point is worse, the fit must take that step.
    nodes = {
        0.0: Node(kl=0.46257, slope=-0.86674, curvature=4.16095),
        1.0: Node(kl=2.77761, slope=1.96243, curvature=1.70132),
        2.0: Node(kl=6.38198, slope=3.75745, curvature=7.43957),
    }

    def objective(alpha):  # the true basin at 0.25; another, shallower one at -0.37
        return min(7.4 * (alpha - 0.25) ** 2, 0.86 + 3.0 * (alpha + 0.37) ** 2)

    def measure(alpha):
        if 7.4 * (alpha - 0.25) ** 2 <= 0.86 + 3.0 * (alpha + 0.37) ** 2:
            return Node(kl=objective(alpha), slope=14.8 * (alpha - 0.25), curvature=14.8, step=0.25 - alpha)
        return Node(kl=objective(alpha), slope=6.0 * (alpha + 0.37), curvature=6.0, step=-0.37 - alpha)

    fit = fit_scale(measure, objective, -1.0, 5.0, nodes)
    assert fit.scale == pytest.approx(0.25, abs=1e-2)
    assert not fit.at_edge
