"""The trainer's view: HF transformers + PEFT forward at any LoRA scale."""

from __future__ import annotations

import torch

from ..adapter.checkpoint import Checkpoint
from ..adapter.inventory import PEFT_PREFIX
from ..errors import BadInput, memory_problem, out_of_memory

ADAPTER_NAME = "default"
PREVIOUS_ADAPTER = "previous"


class Reference:
    """The checkpoint's policy `W0 + s·ΔW` as PEFT computes it, for any scale `s`."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from peft import PeftModel

        self.checkpoint = checkpoint
        self.dtype = dtype
        try:
            base = _model_class(checkpoint).from_pretrained(str(checkpoint.base_dir), dtype=dtype)
            self.model = PeftModel.from_pretrained(base, str(checkpoint.adapter_dir), adapter_name=ADAPTER_NAME)
            if device != "cpu":
                self.model.to(device)  # every table it returns comes back to the CPU (`.cpu()` below)
        except (OSError, ValueError, RuntimeError, KeyError, MemoryError) as error:
            if out_of_memory(error):
                raise memory_problem(f"load the reference model {checkpoint.base_dir} in {dtype}", error) from None
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BadInput(f"cannot load {checkpoint.adapter_dir} on base {checkpoint.base_dir}: {first_line}") from None
        self.model.eval()
        self.adapter = ADAPTER_NAME
        self._index()
        unloaded = sorted(set(checkpoint.module_names) - set(self.module_order))
        if unloaded:
            # PEFT only warns when the file's module names are not the model's: those LoRA weights are
            # then silently left at their initial values, and the reference would not be the trainer's policy.
            raise BadInput(
                f"{checkpoint.adapter_dir}: {len(unloaded)} adapter modules are not modules of "
                f"{type(base).__name__} (e.g. {unloaded[0]}); PEFT would leave them unloaded"
            )

    @classmethod
    def from_peft_model(cls, model, checkpoint: Checkpoint) -> Reference:
        """Wrap a PEFT model that is already loaded (a trainer's policy), without copying it."""
        reference = cls.__new__(cls)
        reference.checkpoint = checkpoint
        reference.model = model
        reference.dtype = next(model.parameters()).dtype
        active = model.active_adapter
        reference.adapter = active if isinstance(active, str) else active[0]
        reference._index()
        return reference

    def _index(self) -> None:
        self.vocab_size = self.model.config.get_text_config().vocab_size
        self.device = next(self.model.parameters()).device
        self._lora_layers = [m for m in self.model.modules() if _is_lora_layer(m)]
        self._scaling = self._own_scaling(self.adapter)
        # Trainable tokens (PEFT's TrainableTokensLayer: trained rows written over the embedding's) carry
        # no scaling: the reference at scale s writes original + s·(trained − original) instead.
        self._token_layers = [m for m in self.model.modules() if _is_token_layer(m)]
        self._trained_rows = self._own_rows(self.adapter)
        # Base module name → position in the architecture (q, k, v, o, gate, up, down per layer).
        self.module_order = {
            name.removeprefix(PEFT_PREFIX): position
            for position, (name, module) in enumerate(self.model.named_modules())
            if _is_lora_layer(module)
        }

    def load_previous(self, previous: Checkpoint) -> None:
        """Add an older state of the adapter (for telling a stale engine from a wrong one)."""
        try:
            self.model.load_adapter(str(previous.adapter_dir), adapter_name=PREVIOUS_ADAPTER)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise BadInput(f"cannot load previous adapter {previous.adapter_dir}: {error}") from None
        self._scaling.update(self._own_scaling(PREVIOUS_ADAPTER))
        self._trained_rows.update(self._own_rows(PREVIOUS_ADAPTER))
        self.model.set_adapter(self.adapter)

    def set_scale(self, scale: float, adapter: str | None = None) -> None:
        """Multiply every LoRA layer's own scaling (alpha/r, rank/alpha patterns included) by `scale`."""
        adapter = adapter or self.adapter
        for module in self._lora_layers:
            if adapter in module.scaling:
                module.scaling[adapter] = self._scaling[(id(module), adapter)] * scale
        for module in self._token_layers:
            trained = self._trained_rows.get((id(module), adapter))
            if trained is not None:
                original = module.trainable_tokens_original[adapter]
                module.trainable_tokens_delta[adapter].data.copy_(original + scale * (trained - original))

    @torch.inference_mode()
    def prompt_logprobs(self, prompts: list[list[int]], scale: float = 1.0, adapter: str | None = None) -> list[torch.Tensor]:
        """Per prompt, `(len-1, vocab)` float32 log-probs of every next token over the full vocabulary."""
        adapter = adapter or self.adapter
        self.model.set_adapter(adapter)
        self.set_scale(scale, adapter)
        try:
            out = []
            for ids in prompts:
                logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1]
                out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
                del logits  # before the next prompt's forward, not after it
            return out
        finally:
            self.set_scale(1.0, adapter)
            self.model.set_adapter(self.adapter)

    def prompt_table(self, ids: list[int], scale: float = 1.0, adapter: str | None = None) -> torch.Tensor:
        """One prompt's `(len-1, vocab)` table: what the logit pass holds of the reference at a time."""
        return self.prompt_logprobs([ids], scale, adapter)[0]

    def _own_rows(self, adapter: str) -> dict[tuple[int, str], torch.Tensor]:
        return {
            (id(m), adapter): m.trainable_tokens_delta[adapter].detach().clone()
            for m in self._token_layers
            if adapter in m.trainable_tokens_delta
        }

    @torch.inference_mode()
    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, `(len(continuation), vocab)` float32 log-probs of each continuation token,
        teacher-forced on prompt + continuation at the adapter's own scale. Only those rows are
        projected onto the vocabulary (`logits_to_keep`): at a real vocabulary the projection, not
        the decoder, is most of a forward."""
        self.model.set_adapter(self.adapter)
        out = []
        for ids, tokens in zip(prompts, continuations, strict=True):
            sequence = torch.tensor([ids + tokens], device=self.device)
            keep = len(tokens) + 1  # the prompt's last position predicts the first generated token
            try:
                logits = self.model(input_ids=sequence, logits_to_keep=keep).logits[0, -keep:-1]
            except TypeError:  # a model class without logits_to_keep: project every position
                logits = self.model(input_ids=sequence).logits[0, -keep:-1]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
            del logits
        return out

    def _own_scaling(self, adapter: str) -> dict[tuple[int, str], float]:
        return {(id(m), adapter): m.scaling[adapter] for m in self._lora_layers if adapter in m.scaling}

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: set[int], scale: float = 1.0) -> list[list[int]]:
        """Greedy continuation of each prompt, ending with the end-of-sequence token if one is produced."""
        self.set_scale(scale)
        eos = sorted(eos_token_ids) or None
        try:
            continuations = []
            for ids in prompts:
                output = self.model.generate(
                    input_ids=torch.tensor([ids], device=self.device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos[0] if eos else 0,
                )
                continuations.append(output[0, len(ids) :].tolist())
            return continuations
        finally:
            self.set_scale(1.0)


def _model_class(checkpoint: Checkpoint):
    """The class the base's config.json names (what a trainer instantiates, and what the adapter's
    module names were made for: a multimodal base's language model sits at `model.language_model`);
    AutoModelForCausalLM when transformers does not know that class or it does not generate (a
    classification head)."""
    import transformers


    architectures = checkpoint.base().config.get("architectures") or []
    named = getattr(transformers, str(architectures[0]), None) if architectures else None
    generative = isinstance(named, type) and issubclass(named, transformers.GenerationMixin)
    return named if generative else transformers.AutoModelForCausalLM


def _is_lora_layer(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and hasattr(module, "lora_A")


def _is_token_layer(module: torch.nn.Module) -> bool:
    """A PEFT trainable-tokens layer that holds its own rows (a tied one shares its source's)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return isinstance(module, TrainableTokensLayer) and not module.tied_adapter
