"""What vLLM refuses to load, or loads and does not serve: saved full modules, LoRA on the embedding or
the output head, trainable tokens, DoRA, LoRA biases and other PEFT features it rejects, tensors it does
not know, and ranks above its limit (the facts are read in vLLM's sources: engine/serving.py)."""

from __future__ import annotations

from ..adapter.inventory import EMBEDDING_NAMES, OUTPUT_NAMES, PEFT_PREFIX
from ..engine.serving import BASE_MODIFYING_INITS, EMBEDDING_LORA_ARCHITECTURES, UNSUPPORTED_FEATURES, vllm_lora_ranks
from .context import Context
from .findings import Finding
from .text import abbreviate


def check_modules_to_save(ctx: Context) -> list[Finding]:
    listed = list(ctx.spec.modules_to_save)
    stored = ctx.adapter.full_modules
    if not listed and not stored:
        return []
    names = sorted(set(listed) | {m.rsplit(".", 1)[-1] for m in stored})
    tensors = [t.name for group in stored.values() for t in group]
    copies = [f"{t.name.removeprefix(PEFT_PREFIX)} {list(t.shape)}" for group in stored.values() for t in group]
    held = f"; the file holds the trained full copies {abbreviate(copies, 3)}" if copies else ""
    if set(names) <= {"classifier", "score"}:
        return [
            Finding(
                "modules_to_save",
                "warning",
                f"modules_to_save {names}{held}. vLLM 0.32 loads a full 'classifier'/'score' copy only for "
                "cross-encoder pooling models (lora/model_manager.py:136, 1273); a generative model refuses the adapter",
                "serve it as a classification model, or train without modules_to_save",
                tuple(names + tensors),
            )
        ]
    tied = " (untied from the base's tied embed_tokens)" if ctx.base.ties_embeddings and "lm_head" in names else ""
    return [
        Finding(
            "modules_to_save",
            "problem",
            f"modules_to_save {names}{held}{tied}. vLLM 0.32 refuses the adapter (only None or "
            "['classifier', 'score'] are allowed, lora/peft_helper.py:56-65); engines that skip the check "
            "serve the base's frozen copy, not the trained one",
            "train without modules_to_save (or as LoRA targets vLLM serves), or merge the adapter and sync full weights",
            tuple(names + tensors),
        )
    ]


def check_embedding_loras(ctx: Context) -> list[Finding]:
    findings = []
    archs = ctx.architectures
    served = set().union(*(EMBEDDING_LORA_ARCHITECTURES.get(a, frozenset()) for a in archs)) if archs else set()
    arch = "/".join(archs) or "this architecture"
    for role, names, code in (("the LM head", OUTPUT_NAMES, "lora_on_lm_head"), ("the input embedding", EMBEDDING_NAMES, "lora_on_embed_tokens")):
        modules = sorted(m for m in ctx.adapter.lora_modules if m.rsplit(".", 1)[-1] in names)
        if not modules:
            continue
        tensors = tuple(t.name for m in modules for t in ctx.adapter.lora_modules[m].values())
        short = sorted({m.rsplit(".", 1)[-1] for m in modules})
        if ctx.base.ties_embeddings:
            findings.append(_tied_merge(role, modules))
        if any(s in served for s in short):
            findings.append(
                Finding(
                    code,
                    "info",
                    f"LoRA on {role} ({', '.join(modules)}): vLLM 0.32 serves it for {arch}, which declares "
                    "embedding_modules (lora/utils.py:232-245), through "
                    + ("LogitsProcessorWithLoRA (lora/model_manager.py:567)" if code == "lora_on_lm_head" else "VocabParallelEmbeddingWithLoRA (lora/layers/vocab_parallel_embedding.py:111)"),
                    "no action for vLLM; other engines may not serve LoRA on embeddings",
                    tuple(modules) + tensors,
                )
            )
            continue
        tied = ", tied to embed_tokens in the base" if code == "lora_on_lm_head" and ctx.base.ties_embeddings else ""
        findings.append(
            Finding(
                code,
                "problem",
                f"LoRA on {role} ({', '.join(modules)}{tied}): vLLM 0.32 refuses the adapter for {arch} "
                "('expected target modules in ... but received', lora/lora_model.py:268-279): LoRA on embeddings "
                "is served only for architectures that declare embedding_modules (lora/utils.py:232-245)",
                f"train without {'/'.join(short)} in target_modules, or merge that part into the base weights",
                tuple(modules) + tensors,
            )
        )
    return findings


def _tied_merge(role: str, modules: list[str]) -> Finding:
    other = "the input embedding" if role == "the LM head" else "the output head"
    return Finding(
        "tied_weight_merge",
        "warning",
        f"LoRA on {role} ({', '.join(modules)}) of a base that ties its output head to its input embedding: "
        f"PEFT's forward applies it to {role} only, but a merge (merge_and_unload, the merged syncs of TRL and "
        f"ms-swift) writes its ΔW into the one shared weight, so {other} moves too. Merged syncs then serve "
        "another policy than the one trained (lora-doctor's merged plans replay that merge and measure the gap)",
        "untie the head before training (tie_word_embeddings=False with its own copy), or train without "
        "LoRA on embed_tokens / lm_head",
        tuple(modules),
    )


def check_trainable_tokens(ctx: Context) -> list[Finding]:
    tokens = ctx.adapter.trainable_tokens
    if not tokens:
        return []
    setting = ctx.spec.trainable_token_indices
    count = sum(t.shape[0] for t in tokens.values())
    return [
        Finding(
            "trainable_tokens",
            "problem",
            f"trainable tokens (trainable_token_indices={setting!r}: {count} trained rows of "
            f"{', '.join(sorted(tokens))}): vLLM 0.32 refuses the adapter ('... is unsupported LoRA weight', "
            "lora/utils.py:220); an adapter sync fails, a merged sync must write the trained rows into the embedding"
            + (" (and the output head tied to it)" if ctx.base.ties_embeddings else ""),
            "sync merged weights (the rows written into the embedding), or train without trainable_token_indices",
            tuple(sorted(tokens)) + tuple(t.name for t in tokens.values()),
        )
    ]


def check_dora(ctx: Context) -> list[Finding]:
    if not ctx.spec.use_dora and not ctx.adapter.magnitude:
        return []
    count = len(ctx.adapter.magnitude)
    return [
        Finding(
            "dora",
            "problem",
            f"DoRA adapter (use_dora, {count} lora_magnitude_vector tensors): vLLM 0.32 refuses it "
            "('vLLM does not yet support DoRA', lora/peft_helper.py:66-67); W0 + s·B·A is not the trained policy",
            "train plain LoRA (use_dora=False), or merge the DoRA adapter into the base and sync full weights",
            tuple(t.name for t in ctx.adapter.magnitude),
        )
    ]


def check_unsupported_features(ctx: Context) -> list[Finding]:
    findings = []
    if ctx.config.get("lora_bias"):
        findings.append(
            Finding(
                "lora_bias",
                "problem",
                "lora_bias=True (a trained bias on lora_B): vLLM 0.32 refuses the adapter (lora/peft_helper.py:68-69)",
                "train with lora_bias=False",
                ("lora_bias",),
            )
        )
    init = ctx.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        findings.append(
            Finding(
                "init_modifies_base",
                "problem",
                f"init_lora_weights={init!r} rewrites the base weights when PEFT loads the adapter: "
                "vLLM 0.32 refuses it (lora/peft_helper.py:70-78)",
                "convert to plain LoRA with PEFT's path_initial_model_for_weight_conversion",
                ("init_lora_weights",),
            )
        )
    for key, label in UNSUPPORTED_FEATURES:
        if ctx.config.get(key):
            findings.append(
                Finding(
                    "unsupported_feature",
                    "problem",
                    f"{key} is set ({label}): vLLM 0.32 refuses the adapter (lora/peft_helper.py:79-86)",
                    f"train without {key}",
                    (key,),
                )
            )
    return findings


def check_bias(ctx: Context) -> list[Finding]:
    bias = ctx.spec.bias
    if bias == "none" and not ctx.adapter.base_layer_bias:
        return []
    tensors = [t.name for t in ctx.adapter.base_layer_bias]
    held = f", {len(tensors)} trained bias tensors in the file" if tensors else ""
    return [
        Finding(
            "bias",
            "problem",
            f"bias={bias!r}{held}: vLLM 0.32 refuses the adapter ('Adapter bias is not supported', "
            "lora/peft_helper.py:199-200); the trained biases are not servable as LoRA",
            'train with bias="none", or merge the adapter and sync full weights',
            tuple(["bias"] + tensors),
        )
    ]


def check_unrecognized(ctx: Context) -> list[Finding]:
    other = [t.name for t in ctx.adapter.other]
    if not other:
        return []
    return [
        Finding(
            "unrecognized_tensor",
            "problem",
            f"{len(other)} adapter tensors are neither LoRA A/B nor a saved module: {abbreviate(other, 3)}; "
            "vLLM 0.32 fails the load on them ('... is unsupported LoRA weight', lora/utils.py:220)",
            "save the adapter with PEFT's save_pretrained (plain LoRA, no trainable tokens or extra parameters)",
            tuple(other),
        )
    ]


def check_rank(ctx: Context) -> list[Finding]:
    allowed, default = vllm_lora_ranks()
    rank = ctx.spec.max_rank
    fitting = [r for r in allowed if r >= rank]
    needed = f"--max-lora-rank {fitting[0]}" if fitting else None
    allowed_text = ", ".join(map(str, allowed))
    source = "max of r and rank_pattern" if ctx.spec.rank_pattern else "r"
    findings = []
    limit = ctx.max_lora_rank
    if limit is not None and limit not in allowed:
        findings.append(
            Finding(
                "max_lora_rank_invalid",
                "warning",
                f"max_lora_rank {limit} is not one vLLM 0.32 accepts ({allowed_text}; config/lora.py:26)",
                f"start vLLM with one of {allowed_text}",
                ("max_lora_rank",),
            )
        )
    if not fitting:
        findings.append(
            Finding(
                "rank_above_max",
                "problem",
                f"LoRA rank {rank} ({source}) is above every max_lora_rank vLLM 0.32 accepts ({allowed_text}); "
                "the adapter is refused (lora/peft_helper.py:193-198)",
                f"train with r <= {allowed[-1]}",
                ("r",),
            )
        )
    elif limit is not None and rank > limit:
        findings.append(
            Finding(
                "rank_above_max",
                "problem",
                f"LoRA rank {rank} ({source}) is above max_lora_rank {limit}: vLLM refuses the adapter "
                f"('LoRA rank {rank} is greater than max_lora_rank {limit}', lora/peft_helper.py:193-198); "
                f"allowed values: {allowed_text}",
                f"start vLLM with {needed}, or train with r <= {limit}",
                ("r",),
            )
        )
    elif limit is None and rank > default:
        findings.append(
            Finding(
                "rank_above_default_max",
                "info",
                f"LoRA rank {rank} ({source}) is above vLLM's default max_lora_rank {default} (config/lora.py:33); "
                f"allowed values: {allowed_text}",
                f"start vLLM with {needed} (or pass --max-lora-rank to check against your engine's setting)",
                ("r",),
            )
        )
    return findings
