"""The ms-swift watch's footing for processed log-probs (pure math against vLLM's own filter; the real
ms-swift runs are in test_trainers.py)."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

from lora_doctor.integrations.ms_swift_watch import KEPT_MASS_ROWS, kept_log_mass

VOCAB = 704  # the fixture's


@pytest.mark.parametrize(("top_k", "top_p"), [(50, 0.9), (None, 0.9), (50, None), (1, None), (None, 0.5)])
def test_policy_log_probs_minus_the_kept_mass_are_the_engines_processed_log_probs(top_k, top_p):
    # Rows peaked to flat (the fixture's policy has both), more rows than one chunk of the computation.
    generator = torch.Generator().manual_seed(0)
    rows = KEPT_MASS_ROWS + 45
    logits = torch.randn(rows, VOCAB, generator=generator) * torch.linspace(0.5, 8.0, rows).unsqueeze(1)
    k = torch.full((rows,), top_k, dtype=torch.long) if top_k else None
    p = torch.full((rows,), top_p) if top_p else None
    # What vLLM's CPU sampler returns as processed log-probs (`forward_cpu`: this filter, then log_softmax).
    processed = apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True).log_softmax(dim=-1)
    # The top token is always kept; a token at the edge of the kept set is the hardest case.
    kept_count = torch.isfinite(processed).sum(dim=-1)
    edge = logits.argsort(dim=-1, descending=True).gather(1, (kept_count - 1).unsqueeze(1)).squeeze(1)
    for tokens in (logits.argmax(dim=-1), edge):
        policy = logits.log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        engine = processed.gather(1, tokens.unsqueeze(1)).squeeze(1)
        assert torch.isfinite(engine).all()
        # float32 log-softmax over 704 logits: agreement to a few ulps of the log-probs.
        torch.testing.assert_close(policy - kept_log_mass(logits, top_k, top_p), engine, atol=1e-5, rtol=0)


def test_no_filter_keeps_all_the_mass_and_the_shape_is_the_positions():
    logits = torch.randn(2, 3, VOCAB)
    kept = kept_log_mass(logits, None, None)
    assert kept.shape == (2, 3)
    torch.testing.assert_close(kept, torch.zeros(2, 3), atol=1e-6, rtol=0)
