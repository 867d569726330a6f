"""Full-vocabulary prompt log-probs read on the worker, as tensors.

vLLM returns `prompt_logprobs=-1` as Python lists: one float, one token id and one rank object per
(position, vocabulary entry) — about 130 bytes each, 4 GB for a single 200-token prompt with a
151,936-token vocabulary, after a full-vocabulary sort on the worker. The engine already holds the
same numbers as one `(positions, vocab)` float32 tensor when it gathers the prompt tokens'
log-probs (`Sampler.gather_logprobs`, called once per request and prefill chunk with the target
tokens). While a capture is on, lora-doctor's worker extension keeps that tensor and its target
tokens; the request itself asks only for the prompt tokens' own log-probs (`prompt_logprobs=0`),
which the front end uses to check that every captured row is the row it claims to be.
"""

from __future__ import annotations

import torch
from vllm.distributed import get_tensor_model_parallel_rank


class PromptLogprobCapture:
    """Mixed into lora-doctor's worker extension: `self.model_runner` is the worker's model runner."""

    def lora_doctor_capture_start(self) -> bool:
        """Keep every prompt log-prob table the sampler gathers from now on; False when this
        model runner has no such hook (then the front end reads vLLM's own output)."""
        sampler = getattr(self.model_runner, "sampler", None)
        if sampler is None or not hasattr(sampler, "gather_logprobs"):
            return False
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        gather = type(sampler).gather_logprobs

        def gather_and_keep(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor):
            # On CPU `.cpu()` is the tensor itself: the worker already allocated it, nothing is copied.
            captured.append((token_ids.detach().cpu(), logprobs.detach().float().cpu()))
            return gather(logprobs, num_logprobs, token_ids)

        self._lora_doctor_captured = captured
        sampler.gather_logprobs = gather_and_keep
        return True

    def lora_doctor_capture_stop(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Stop capturing; `(target token ids, (rows, vocab) log-probs)` per gathered chunk, in the
        order the engine computed them, from the first rank only (the one that gathers full logits)."""
        sampler = self.model_runner.sampler
        sampler.__dict__.pop("gather_logprobs", None)
        captured = getattr(self, "_lora_doctor_captured", [])
        self._lora_doctor_captured = []
        return captured if get_tensor_model_parallel_rank() == 0 else None
