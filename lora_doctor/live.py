"""Use lora-doctor where the bug happens: a gate before resuming, a probe on a trainer's own engine."""

from __future__ import annotations

import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from . import defaults
from .adapter.checkpoint import Checkpoint, spec_from_config
from .adapter.dtypes import dtype_name
from .checker import check
from .engine.deadline import EngineStalled
from .engine.driver import WORKER_EXTENSION, Engine
from .engine.platform import V1, model_runner, module_read_problem, quantization_problem, runner_note, uncaptured_chunk_positions
from .errors import BadInput, ProblemDetected
from .measure.logit_pass import CHUNK_POSITIONS
from .measure.phase import PhaseMeasurer
from .measure.prompts import load_prompts
from .measure.reference import Reference
from .measure.verdict import UNRESOLVED, Thresholds
from .random_state import preserves_random_state
from .result import PhaseResult, Report


@preserves_random_state
def gate(checkpoint: str | Path, *, plan: str = defaults.PLAN, **options) -> Report:
    """Run `check` and raise `ProblemDetected` (exit code 1) unless every phase is healthy.

    For the top of a training script: refuse to resume when the configured sync path would corrupt
    the policy. Returns the report when it passes. `options` are `check`'s (e.g. `engine_timeout=`:
    an engine that makes no progress for that many seconds ends the gate with `EngineStalled`, exit 3).
    """
    report = check(checkpoint, plan=plan, **options)
    if not report.ok:
        wrong = [f"phase {p.index + 1} {p.name}: {p.verdict} (α = {_scale(p.effective_scale)})" for p in report.phases if not p.ok]
        if report.stopped:
            wrong = [report.stopped]
        raise ProblemDetected(f"lora-doctor gate failed for plan {report.plan['name']}: " + "; ".join(wrong), report)
    return report


@preserves_random_state
def probe(
    llm,
    model,
    *,
    lora_request=None,
    prompts: str | Path | list[str] | None = defaults.PROMPTS,
    tokenizer=None,
    base_dir: str | Path | None = None,
    thresholds: Thresholds | None = None,
    max_new_tokens: int = defaults.PROBE_MAX_NEW_TOKENS,
    module_read: bool = defaults.MODULE_READ,
    name: str = "probe",
    engine_timeout: float = defaults.ENGINE_TIMEOUT,
) -> PhaseResult:
    """Measure a trainer's engine against its PEFT policy, touching neither's weights.

    `llm` is a `vllm.LLM` or a `vllm.LLMEngine`, with or without LoRA enabled, with or without
    lora-doctor's worker extension; it must be built with `max_logprobs=-1`. `lora_request` is what
    the trainer passes to `generate` (None when it generates from merged weights). The logit figures
    are always measured; the per-module figures when the engine allows them (LoRA enabled, the
    worker extension, the base model in a local folder: `base_dir`, default the folder the policy's
    base was loaded from). What was not measured, and why, is in the result's `not_measured`.

    An engine that cannot serve now (asleep: TRL's and ms-swift's sleep mode pause its scheduler) is
    sent no request: the result is `unresolved`, with the reason in `not_measured["engine"]`; probe
    when it is awake. `engine_timeout`: the longest, in seconds, the engine may make no progress on the
    probe's requests; past it they are aborted (the engine keeps serving the trainer's) and
    `EngineStalled` is raised (an `EnvironmentProblem`).
    """
    engine = Engine.attach(llm, timeout=engine_timeout)
    if lora_request is not None and not engine.lora_enabled:
        raise BadInput("a lora_request was given but the engine was built without enable_lora: it cannot serve an adapter")
    unavailable = engine.unavailable()
    if unavailable is not None:
        return not_measured(name, lora_request is not None, f"no request was sent: {unavailable}; probe when the engine is awake")
    tokenizer = tokenizer or engine.core.get_tokenizer()
    texts = load_prompts(prompts)
    token_ids = [tokenizer(text).input_ids for text in texts]
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="lora-doctor-probe-") as tmp:
            checkpoint = _snapshot(model, Path(tmp), base_dir)
            reference = Reference.from_peft_model(model, checkpoint)
            quantized = quantization_problem(checkpoint.base().config if (checkpoint.base_dir / "config.json").is_file() else {}, engine.quantization)
            if quantized:
                raise BadInput(quantized)
            skipped = _unmeasured_layers(engine, checkpoint, module_read)
            limits = thresholds or Thresholds.for_dtype(_least_precise(reference.dtype, engine.dtype))
            runner = model_runner(engine.core.vllm_config)
            # Without the capture (V2), each full-vocabulary table is vLLM's Python objects: fewer positions at a time.
            chunk = CHUNK_POSITIONS if runner == V1 else uncaptured_chunk_positions(engine.vocab_size)
            measurer = PhaseMeasurer(reference, None, tokenizer, texts, token_ids, max_new_tokens, limits, not skipped, chunk_positions=chunk)
            result = measurer(engine, 0, name, lora_request, lambda _message: None)
            result.not_measured.update(skipped)
            if runner != V1:
                result.not_measured["capture"] = runner_note(runner)
            return result
    finally:
        model.train(was_training)


def not_measured(name: str, with_adapter: bool, reason: str) -> PhaseResult:
    """A probe that measured nothing: `unresolved`, every figure NaN, the reason under "engine"."""
    nan = float("nan")
    return PhaseResult(
        index=0,
        name=name,
        with_adapter=with_adapter,
        verdict=UNRESOLVED,
        explanation=f"the engine was not measured: {reason}",
        effective_scale=nan,
        kl_at_scale=nan,
        kl_mean=nan,
        kl_max=nan,
        top1_agreement=nan,
        greedy_match=nan,
        kl_limit=None,
        decided_by="nothing",
        not_measured={"engine": reason},
    )


class RouteRecorder:
    """The `lora_request` the trainer's own rollouts pass, recorded where they enter the engine.

    Wraps `target.method` (TRL: `vllm.LLM.generate`; ms-swift: `LLMEngine.add_request`) on that one
    object; every call made outside `own_requests()` records its `lora_request` keyword (None: the
    rollouts named no adapter). A probe then measures the route the trainer really took.

    The wrapper stays until `close()` (or the end of a `with RouteRecorder(...)` block), which puts
    the object's method back as it was; a callback that records for a whole run closes it when the
    run ends.
    """

    def __init__(self, target, method: str):
        self.seen = False
        self.lora_request = None
        self._own = 0
        self._target, self._method = target, method
        # The object's own attribute, if it had one (else the class's method shows through again).
        self._own_attribute = vars(target).get(method, _ABSENT) if hasattr(target, "__dict__") else _ABSENT
        original = getattr(target, method)

        def recording(*args, **kwargs):
            if not self._own:
                self.seen = True
                self.lora_request = kwargs.get("lora_request")
            return original(*args, **kwargs)

        self._recording = recording
        setattr(target, method, recording)

    def close(self) -> None:
        """Give the object its method back (once; a wrapper someone installed over ours is left alone)."""
        if self._target is None:
            return
        if vars(self._target).get(self._method) is self._recording:
            if self._own_attribute is _ABSENT:
                delattr(self._target, self._method)
            else:
                setattr(self._target, self._method, self._own_attribute)
        self._target = None

    def __enter__(self) -> RouteRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextmanager
    def own_requests(self):
        """lora-doctor's own requests (a probe's), which say nothing of the trainer's route."""
        self._own += 1
        try:
            yield
        finally:
            self._own -= 1


_ABSENT = object()


def probe_at_step(llm, model, step: int, *, recorder: RouteRecorder | None, given, what: str = "the probe", **options) -> tuple[PhaseResult, str]:
    """A trainer integration's full probe at `step` (named "step-N"), and where its route came from.

    The route is the `lora_request` the recorder saw on the trainer's own rollouts ("the trainer's
    rollouts"), else `given()` ("given"; called only then); the probe's own requests are kept out of
    the recorder. A probe whose requests the engine left without progress (`EngineStalled`) measured
    nothing: a warning naming `what`, and `not_measured`, never a failed sync. `options` go to `probe`.
    """
    if recorder is not None and recorder.seen:
        lora_request, source = recorder.lora_request, "the trainer's rollouts"
    else:
        lora_request, source = given(), "given"
    try:
        with recorder.own_requests() if recorder is not None else nullcontext():
            result = probe(llm, model, lora_request=lora_request, name=f"step-{step}", **options)
    except EngineStalled as stalled:
        # The probe's requests were aborted and the engine keeps serving the trainer's: a probe that
        # measured nothing is no failed sync, and ending a training run over it would be lora-doctor's doing.
        warnings.warn(f"lora-doctor: {what} at step {step} measured nothing: {stalled}", stacklevel=3)
        result = not_measured(f"step-{step}", lora_request is not None, str(stalled))
    return result, source


def _scale(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _unmeasured_layers(engine: Engine, checkpoint: Checkpoint, wanted: bool) -> dict[str, str]:
    """Why the per-module figures cannot be read from this engine (empty: they can)."""
    if not wanted:
        return {"layers": "per-module figures were not asked for (module_read=False)"}
    if not engine.has_worker_extension:
        return {"layers": f"the engine was built without worker_extension_cls={WORKER_EXTENSION!r}"}
    read_problem = module_read_problem(engine.core.vllm_config.parallel_config)
    if read_problem:
        return {"layers": read_problem}
    if not engine.lora_enabled:
        return {
            "layers": "the engine was built without enable_lora (it serves merged weights): lora-doctor reads "
            "per-module weights from LoRA-wrapped layers only; the logit figures cover the merged sync"
        }
    if not (checkpoint.base_dir / "config.json").is_file():
        return {"layers": f"the base model is not in a local folder ({checkpoint.base_dir}); pass base_dir="}
    return {}


def _least_precise(*dtypes: torch.dtype) -> str:
    """The dtype whose thresholds apply when reference and engine compute in different precisions."""
    names = [dtype_name(dtype) for dtype in dtypes]
    return next((name for name in names if name != "float32"), "float32")


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
