"""How far a policy moved between two syncs: its log-probs on the probe's prompts at each, and the mean
KL between them. A stale engine (still holding the previous policy) would show that KL; the trainer
tests compare it with the probe's KL limit. Used by the TRL script (tests/trl_moving_policy.py) and by
the ms-swift shim (tests/shims/swift/sitecustomize.py), in their own processes."""


def policy_log_probs(model, tokenizer, texts: list[str]) -> list:
    """The policy's log-probs over the vocabulary at every token of each text (no gradient, eval mode)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        tables = [torch.log_softmax(model(**tokenizer(text, return_tensors="pt")).logits[0].float(), -1) for text in texts]
    model.train(was_training)
    return tables


def mean_kl(newer: list, older: list) -> float:
    """Mean over every prompt token of KL(newer ‖ older)."""
    kls = [(new.exp() * (new - old)).sum(-1) for new, old in zip(newer, older, strict=True)]
    return float(sum(kl.sum() for kl in kls) / sum(kl.numel() for kl in kls))
