"""A hand-written trainer loop on an engine with prefix caching on (vLLM's default), probed with `probe`.

The loop syncs its LoRA the way vLLM #42125 describes: it rewrites one adapter folder and re-adds it
under the same name and id with `load_inplace=True`, generating rollouts between syncs. Without
`reset_prefix_cache()` the rollouts after a training step read KV blocks of the policy before it.
"""

from __future__ import annotations

import pytest
from conftest import BASE, CHECKPOINT, PREVIOUS, adapter_modules, layer_modules, sync_weights

from lora_doctor import probe
from lora_doctor.measure.prompts import DEFAULT_PROMPTS

# The rollouts' own prompts: the built-in set, whose shared system prompt fills a 128-token block.
ROLLOUT_PROMPTS = DEFAULT_PROMPTS


@pytest.fixture
def llm(user_llm):
    """The trainer's engine: LoRA, full-vocabulary log-probs, lora-doctor's worker extension, and
    vLLM's defaults for the rest (prefix caching on)."""
    from safetensors.torch import load_file

    assert user_llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    # As the trainer's engine starts: the base from disk, no adapter (other tests share the engine).
    for lora_id in user_llm.llm_engine.list_loras():
        user_llm.llm_engine.remove_lora(lora_id)
    sync_weights(user_llm, load_file(str(BASE / "model.safetensors")).items())
    return user_llm


class Loop:
    """A trainer's loop: a PEFT policy, one adapter folder, rollouts between syncs."""

    def __init__(self, llm, folder):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from vllm.lora.request import LoRARequest

        self.llm = llm
        self.folder = folder
        # The policy at an earlier step of the run.
        self.model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), str(PREVIOUS), is_trainable=True)
        self.request = LoRARequest("policy", 1, str(folder), load_inplace=True)

    def sync(self) -> None:
        """Write the adapter into its folder and reload it in place under the same name and id."""
        self.model.save_pretrained(str(self.folder))
        self.llm.llm_engine.add_lora(self.request)

    def rollouts(self) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tokenizer = self.llm.get_tokenizer()
        prompts = [TokensPrompt(prompt_token_ids=tokenizer(text).input_ids) for text in ROLLOUT_PROMPTS]
        self.llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0), lora_request=self.request, use_tqdm=False)

    def train_step(self) -> None:
        """An optimizer step, here to the run's later state (checkpoint-500 of the same LoRA)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(CHECKPOINT / "adapter_model.safetensors")))


def test_a_loop_without_cache_reset_reads_stale_blocks_and_a_reset_fixes_it(llm, tmp_path):
    loop = Loop(llm, tmp_path / "policy")
    loop.sync()
    loop.rollouts()
    loop.train_step()
    loop.sync()  # same name, same folder, in place; no reset_prefix_cache()

    stale = probe(llm, loop.model, lora_request=loop.request, prompts=ROLLOUT_PROMPTS)
    assert stale.verdict == "stale_cache", stale.explanation
    # The probe's result says its prompts reached the cache (two of them fill a 128-token block).
    assert stale.decode_cache_blocks >= 2 and "stale_cache" not in stale.not_measured
    # The engine holds the new adapter and computes it on the prompt path: only the rollouts are stale.
    assert stale.kl_mean <= stale.kl_limit
    assert layer_modules(stale.layers) == adapter_modules(CHECKPOINT)
    assert all(layer.verdict == "ok" for layer in stale.layers)
    assert stale.decode_kl_mean > stale.kl_limit >= stale.decode_kl_no_cache

    llm.reset_prefix_cache()
    fresh = probe(llm, loop.model, lora_request=loop.request, prompts=ROLLOUT_PROMPTS)
    assert fresh.verdict == "ok", fresh.explanation
    assert fresh.decode_kl_mean <= fresh.kl_limit


def test_a_loop_that_resets_after_every_sync_stays_ok(llm, tmp_path):
    loop = Loop(llm, tmp_path / "policy")
    loop.sync()
    llm.reset_prefix_cache()
    loop.rollouts()
    loop.train_step()
    loop.sync()
    llm.reset_prefix_cache()
    result = probe(llm, loop.model, lora_request=loop.request, prompts=ROLLOUT_PROMPTS)
    assert result.verdict == "ok", result.explanation
