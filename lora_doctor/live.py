"""Use lora-doctor where the bug happens: a gate before resuming, a probe on a trainer's own engine."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .check import DEFAULT_PLAN, _Measurer, check
from .checkpoint import Checkpoint, spec_from_config
from .engine import Engine
from .errors import ProblemDetected
from .prompts import load_prompts
from .reference import Reference
from .result import PhaseResult, Report
from .verdict import Thresholds


def gate(checkpoint: str | Path, *, plan: str = DEFAULT_PLAN, **options) -> Report:
    """Run `check` and raise `ProblemDetected` (exit code 1) unless every phase is healthy.

    For the top of a training script: refuse to resume when the configured sync path would corrupt
    the policy. Returns the report when it passes.
    """
    report = check(checkpoint, plan=plan, **options)
    if not report.ok:
        wrong = [f"phase {p.index + 1} {p.name}: {p.verdict} (α = {p.effective_scale:.2f})" for p in report.phases if not p.ok]
        raise ProblemDetected(f"lora-doctor gate failed for plan {report.plan['name']}: " + "; ".join(wrong), report)
    return report


def probe(
    llm,
    model,
    *,
    lora_request=None,
    prompts: str | Path | list[str] | None = None,
    tokenizer=None,
    base_dir: str | Path | None = None,
    thresholds: Thresholds | None = None,
    max_new_tokens: int = 16,
    layers: bool = True,
    name: str = "probe",
) -> PhaseResult:
    """Measure an existing `vllm.LLM` against an existing PEFT model, touching neither's weights.

    `lora_request` is what the trainer passes to `generate` (None when it generates from merged
    weights). Per-module figures need the engine built with
    `worker_extension_cls="lora_doctor.worker.LoraDoctorWorker"` and the base model in a local folder
    (`base_dir`, default: the adapter config's `base_model_name_or_path`); without them only the
    logit figures are measured. The engine must be built with `max_logprobs=-1`.
    """
    engine = Engine.attach(llm)
    tokenizer = tokenizer or llm.get_tokenizer()
    texts = list(prompts) if isinstance(prompts, list) else load_prompts(prompts)
    token_ids = [tokenizer(text).input_ids for text in texts]
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="lora-doctor-probe-") as tmp:
            checkpoint = _snapshot(model, Path(tmp), base_dir)
            reference = Reference.from_peft_model(model, checkpoint)
            measure_layers = layers and engine.has_worker_extension and (checkpoint.base_dir / "config.json").is_file()
            # The engine's rounding sets the noise, not the policy's: a float32 policy may feed a bf16 engine.
            limits = thresholds or Thresholds.for_dtype(_dtype_name(llm.llm_engine.model_config.dtype))
            measurer = _Measurer(reference, None, tokenizer, texts, token_ids, max_new_tokens, limits, measure_layers)
            return measurer(engine, 0, name, lora_request, lambda _message: None)
    finally:
        model.train(was_training)


def _snapshot(model, folder: Path, base_dir: str | Path | None) -> Checkpoint:
    """The model's active adapter saved as a PEFT folder (ΔW is read from it per module)."""
    active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    model.save_pretrained(str(folder), selected_adapters=[active])
    adapter_dir = folder if active == "default" else folder / active
    config = model.peft_config[active]
    # The path the policy's base was loaded from; the adapter config's may be relative to elsewhere.
    loaded_from = getattr(model.get_base_model().config, "_name_or_path", "") or config.base_model_name_or_path or ""
    base = Path(base_dir) if base_dir is not None else Path(loaded_from)
    return Checkpoint(
        adapter_dir=adapter_dir,
        base_dir=base,
        base_model=str(config.base_model_name_or_path),
        spec=spec_from_config(config.to_dict(), adapter_dir),
        module_names=[],
    )


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
