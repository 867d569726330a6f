"""Prompt sets: the user's own (a few from the training set are best) or a small built-in one."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter.checkpoint import Checkpoint
from ..errors import BadInput

# The system prompt and chat template RL prompts share: long enough that the shared prefix fills a
# whole KV block on the CPU backend (128 tokens; 16 on GPUs), the only thing vLLM's prefix cache
# keeps, so rollouts after a sync read the cache exactly where a trainer's do (142 tokens with the
# bundled tokenizer; a real tokenizer's are shorter, still above 128 with the prompt).
SYSTEM_PREFIX = (
    "<|im_start|>system\nYou are a careful math tutor in a reinforcement learning run. Read the question, think "
    "step by step, and write the reasoning before the answer. Check every sum twice, then answer with a number "
    "only.<|im_end|>\n<|im_start|>user\n"
)
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\nAnswer:"

# Short math questions in the "Question: … / Answer:" shape common to GRPO reasoning runs, then the
# same kind behind a shared system prompt and chat template (the prompts that reach the prefix cache).
DEFAULT_PROMPTS = [
    "Question: what is 12 plus 7?\nAnswer:",
    "Question: what is 9 plus 15?\nAnswer:",
    "Question: what is 14 minus 6?\nAnswer:",
    "Question: what is 7 times 3?\nAnswer:",
    f"{SYSTEM_PREFIX}Question: what is 8 plus 13?{CHAT_SUFFIX}",
    f"{SYSTEM_PREFIX}Question: what is 16 minus 9?{CHAT_SUFFIX}",
]


def cached_blocks(token_ids: list[list[int]], block_size: int) -> int:
    """How many full KV blocks the prompts' requests can read from the prefix cache: vLLM caches
    only full blocks, and recomputes at least a prompt's last token."""
    return sum((len(ids) - 1) // block_size for ids in token_ids)


def engine_cache_blocks(token_ids: list[list[int]], options: dict) -> int:
    """`cached_blocks` on an engine with these options: 0 with prefix caching off."""
    return cached_blocks(token_ids, options["block_size"]) if options["enable_prefix_caching"] else 0


def load_prompts(prompts: str | Path | list[str] | None) -> list[str]:
    """The prompts to measure with: a list given in Python, a .jsonl file ({"prompt": ...} per line), a
    text file (one per line), or the built-in set; `BadInput` for an empty set or a prompt that is not
    non-empty text (a prompt must give the model at least one token to read)."""
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(prompts, (list, tuple)):
        return _checked(list(prompts), "prompts")
    path = Path(prompts)
    if not path.is_file():
        raise BadInput(f"prompts file not found: {path}")
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"cannot read prompts file {path} ({error})") from None
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                prompts.append(record["prompt"] if isinstance(record, dict) else str(record))
            except (json.JSONDecodeError, KeyError):
                raise BadInput(f'{path}:{number}: expected a JSON object with a "prompt" field') from None
    else:
        prompts = [line.replace("\\n", "\n") for line in lines]
    return _checked(prompts, f"prompts file {path}")


def _checked(prompts: list, source: str) -> list[str]:
    if not prompts:
        raise BadInput(f"{source} holds no prompts")
    for number, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str):
            raise BadInput(f"{source}: prompt {number} is {type(prompt).__name__} {prompt!r}, not text")
        if not prompt.strip():
            raise BadInput(f"{source}: prompt {number} is empty")
    return prompts


def load_tokenizer(ckpt: Checkpoint):
    """The tokenizer the trainer saved beside the adapter, else the base's."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir))
    except (OSError, ValueError) as error:
        raise BadInput(f"no usable tokenizer in {ckpt.tokenizer_dir} ({error})") from None


def tokenize(tokenizer, texts: list[str], ckpt: Checkpoint) -> list[list[int]]:
    # verbose=False: a prompt over the tokenizer's own limit is reported by the length check, in one line.
    token_ids = [tokenizer(text, verbose=False).input_ids for text in texts]
    empty = [i + 1 for i, ids in enumerate(token_ids) if not ids]
    if empty:
        # transformers builds an empty tokenizer from a config alone, when the vocabulary files are missing.
        raise BadInput(f"the tokenizer in {ckpt.tokenizer_dir} turns prompt {empty[0]} into no tokens: is tokenizer.json missing there?")
    return token_ids


def position_limit(ckpt: Checkpoint, token_ids: list[list[int]], max_new_tokens: int) -> int | None:
    """The base model's position limit; `BadInput` when a prompt plus the continuation exceeds it.

    Prompts are never truncated: a cut prompt is not the one the user's rollouts see, and a prompt
    longer than the model's context cannot be a training prompt of that model either.
    """
    from transformers import AutoConfig

    try:
        # The base's config.json as the checkpoint read it, made into transformers' config class.
        limit = getattr(AutoConfig.for_model(**ckpt.base().config).get_text_config(), "max_position_embeddings", None)
    except (OSError, ValueError, TypeError):
        return None  # the reference's own load says what is wrong with the base
    longest = max(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    needed = len(token_ids[longest]) + max_new_tokens + 1
    if limit is not None and needed > limit:
        raise BadInput(
            f"prompt {longest + 1} has {len(token_ids[longest])} tokens: with {max_new_tokens} new tokens it needs {needed} "
            f"positions, more than the model's {limit}; shorten it or lower --max-new-tokens"
        )
    return limit
