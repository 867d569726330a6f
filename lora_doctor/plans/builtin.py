"""Named sync plans: the sequence of syncs a trainer performs, each followed by a probe.

A plan is a function of a `Sync` handle (see `sync.py` for its API). The built-in plans use the same
API a custom plan does: `--plan path/to/file.py:function` or `--plan package.module:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, LoraDoctorError, memory_problem, out_of_memory
from .sync import Sync

# Merge/unmerge rounds before the drift plan's final merge: a few hundred optimizer steps.
DRIFT_CYCLES = 200


@dataclass(frozen=True)
class Plan:
    name: str
    summary: str
    function: Callable[[Sync], None]
    needs_previous: bool = False
    # The plan loads the checkpoint's adapter into the engine (an adapter sync); None: unknown (a custom plan).
    adapter_sync: bool | None = None
    # The file a custom plan was loaded from: its errors are the user's, reported at their line.
    source: str | None = None

    def run(self, sync: Sync) -> None:
        """Replay the plan on `sync`; a custom plan's own failure is bad input, never a crash."""
        try:
            self.function(sync)
        except LoraDoctorError:
            raise
        except Exception as error:
            if out_of_memory(error):  # wherever it happens, the plan's code or lora-doctor's
                raise memory_problem(f"run plan {self.name}", error) from None
            where = self._user_frame(error)
            if where is None:
                raise  # lora-doctor's own code failed: a crash, not the user's input
            raise BadInput(f"plan {self.name} failed at {where}: {type(error).__name__}: {error}") from None
        if not sync.phases:
            raise BadInput(f"plan {self.name} measured nothing: it never called sync.probe(name)")

    def _user_frame(self, error: BaseException) -> str | None:
        """`file:line` in the custom plan's source when the error is the plan's, else None (lora-doctor's).

        The plan's: its own code raised it (the innermost frame of the plan or of lora-doctor is the
        plan's; library code it called counts as its own), or it called a `sync` operation with an
        argument of a type the operation does not take. An error raised inside lora-doctor's code
        otherwise is lora-doctor's, as under a built-in plan. A plan file inside the lora_doctor
        package is lora-doctor's code.
        """
        if self.source is None or _inside_lora_doctor(self.source):
            return None
        plan_file = Path(self.source).resolve()
        owners = []  # per traceback entry: "plan", "lora_doctor" or None (a library)
        tb = error.__traceback__
        while tb is not None:
            path = Path(tb.tb_frame.f_code.co_filename).resolve()
            owners.append(("plan" if path == plan_file else "lora_doctor" if _inside_lora_doctor(path) else None, tb))
            tb = tb.tb_next
        ours = [(owner, tb) for owner, tb in owners if owner is not None]
        plan_frames = [tb for owner, tb in ours if owner == "plan"]
        if not plan_frames:
            return None
        last = plan_frames[-1]
        where = f"{last.tb_frame.f_code.co_filename}:{last.tb_lineno}"
        if ours[-1][0] == "plan":
            return where
        called = next((tb for owner, tb in ours[ours.index(("plan", last)) + 1 :]), None)
        misuse = _wrong_argument(called.tb_frame) if called is not None else None
        return f"{where} ({misuse})" if misuse else None


LORA_DOCTOR_DIR = Path(__file__).resolve().parents[1]


def _inside_lora_doctor(path: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(LORA_DOCTOR_DIR)


def _wrong_argument(frame) -> str | None:
    """For the frame of a `Sync` operation: the argument whose value its annotation does not admit."""
    method = getattr(Sync, frame.f_code.co_name, None)
    if method is None or getattr(method, "__code__", None) is not frame.f_code:
        return None
    hints = typing.get_type_hints(method)
    for name, hint in hints.items():
        if name != "return" and name in frame.f_locals and not _admits(hint, frame.f_locals[name]):
            return f"{frame.f_code.co_name}: {name}={frame.f_locals[name]!r} is not {_hint_name(hint)}"
    return None


def _admits(hint, value) -> bool:
    """Whether `value` is of the annotated type (a union: any of its members; `float` also takes an int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_admits(member, value) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    return not isinstance(origin, type) or isinstance(value, origin)


def _hint_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def swift_colocate_lora(sync: Sync) -> None:
    # ms-swift 3.10.0–4.0.1, colocate + vllm_enable_lora, after resume_from_checkpoint (#8233): the
    # first sync sends merged weights as the engine's base and generates from them without an adapter;
    # later syncs add the adapter on top of that merged base. `_move_model_to_vllm` resets the prefix
    # cache after every push, full or adapter.
    sync.load_merged()
    sync.reset_cache()
    sync.probe("full-merged")
    sync.add_adapter()
    sync.reset_cache()
    sync.probe("adapter")


def swift_fixed(sync: Sync) -> None:
    # ms-swift >= 4.0.2 (PR #8275): the first full sync sends the unmerged base and adds the adapter at
    # its end; later syncs send the adapter only; `_move_model_to_vllm` resets the prefix cache after each.
    sync.load_base()
    sync.add_adapter()
    sync.reset_cache()
    sync.probe("full-base")
    sync.add_adapter()
    sync.reset_cache()
    sync.probe("adapter")


def merged(sync: Sync) -> None:
    # Merge → push every weight → unmerge at every step (TRL's vLLM sync; ms-swift with
    # vllm_enable_lora false); generation never uses an adapter. Both reset the prefix cache after
    # every push (TRL's `sync_weights`, ms-swift's `_move_model_to_vllm`).
    sync.load_merged()
    sync.reset_cache()
    sync.probe("full-merged")
    sync.load_merged()
    sync.reset_cache()
    sync.probe("full-merged")


def trl_sleep_reload(sync: Sync) -> None:
    # TRL colocate with vLLM sleep mode (trl #5312, #2856): the merged weights are pushed, then the
    # engine's wake-up reloads its weights from the model folder on disk, so rollouts run on W0.
    # `sync_weights` resets the prefix cache after the push; sleep discards the KV cache.
    sync.load_merged()
    sync.reset_cache()
    sync.probe("full-merged")
    sync.reload_from_disk()
    sync.reset_cache()
    sync.probe("after-wake-up")


def verl_adapter(sync: Sync) -> None:
    # verl with LoRA rollouts (verl #3516, #6782 for its failure modes): the engine keeps the base it
    # loaded from disk and receives only the adapter, under a fresh id, at every sync. A fresh id is a
    # fresh name, whose KV blocks no earlier rollout wrote; verl frees its KV cache between rollouts
    # (the engine sleeps), so no plan step reads an earlier policy's blocks.
    sync.reload_from_disk()
    sync.add_adapter()
    sync.reset_cache()
    sync.probe("adapter")
    sync.add_adapter()
    sync.reset_cache()
    sync.probe("adapter")


def adapter_reused_id(sync: Sync) -> None:
    # An adapter sync that re-adds new weights under the id the engine already cached, without
    # load_inplace=True: vLLM keeps serving the cached (previous) adapter. The prefix cache is reset
    # after each sync, so what is measured is the adapter the engine holds.
    sync.reload_from_disk()
    sync.add_adapter(id=1, weights="previous")
    sync.reset_cache()
    sync.add_adapter(id=1, weights="current")
    sync.reset_cache()
    sync.probe("adapter-same-id")


def merged_bf16_drift(sync: Sync) -> None:
    # Merge/unmerge in bf16 at every step (trl #6688): rounding error accumulates in the trainer's
    # copy of W0, so the pushed weights drift from W0 + ΔW. TRL resets the prefix cache after the push.
    sync.load_merged(dtype="bfloat16", cycles=DRIFT_CYCLES)
    sync.reset_cache()
    sync.probe(f"full-merged-bf16x{DRIFT_CYCLES}")


def rslora_ignored(sync: Sync) -> None:
    # A merge that scales an rsLoRA adapter as plain LoRA (alpha/r instead of alpha/sqrt(r)): the
    # engine ends up with ΔW/sqrt(r).
    spec = sync.checkpoint.spec
    if not spec.use_rslora:
        raise BadInput("plan rslora-ignored needs an rsLoRA adapter (use_rslora: true in adapter_config.json)")
    sync.load_merged(scale=1 / math.sqrt(spec.r))
    sync.reset_cache()
    sync.probe("full-merged-plain-scaling")


def vllm_inplace_same_path(sync: Sync) -> None:
    # vLLM #42125: rollouts with adapter A, then adapter B written into the same folder and re-added
    # under the same name and id with load_inplace=True, with prefix caching on and no reset: the
    # weights are B's, but the rollouts read A's KV blocks (the cache keys on name and folder).
    sync.reload_from_disk()
    sync.reset_cache()
    sync.add_adapter(id=1, weights="previous")
    sync.rollout()
    sync.add_adapter(id=1, load_inplace=True, weights="current")
    sync.probe("adapter-inplace-same-path")


def merged_no_cache_reset(sync: Sync) -> None:
    # A merged sync without reset_prefix_cache(): rollouts of the previous policy (the base, before
    # the first step) fill the cache, merged weights are pushed, and the rollouts read stale blocks.
    sync.reload_from_disk()
    sync.reset_cache()
    sync.rollout()
    sync.load_merged()
    sync.probe("full-merged-no-reset")


def rollout_without_adapter(sync: Sync) -> None:
    # The adapter is synced but the rollouts' generate calls do not name it (ms-swift #9855, miles
    # #2075): the base model generates while the adapter sits loaded.
    sync.reload_from_disk()
    sync.add_adapter()
    sync.reset_cache()
    sync.drop_adapter()
    sync.probe("rollout-without-adapter")


PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan("swift-colocate-lora", "ms-swift 3.10.0–4.0.1 colocate LoRA after resume: merged base, then adapter on top (#8233)", swift_colocate_lora, adapter_sync=True),
        Plan("swift-fixed", "ms-swift >= 4.0.2: unmerged base + adapter, then adapter syncs (PR #8275)", swift_fixed, adapter_sync=True),
        Plan("merged", "merge, push all weights, unmerge at every step (TRL; ms-swift without vllm_enable_lora)", merged, adapter_sync=False),
        Plan("trl-sleep-reload", "TRL sleep mode: merged weights pushed, then wake-up reloads the base from disk (#5312)", trl_sleep_reload, adapter_sync=False),
        Plan("verl-adapter", "verl LoRA rollouts: disk base + the adapter under a fresh id at every sync", verl_adapter, adapter_sync=True),
        Plan("adapter-reused-id", "new adapter weights re-added under a cached id without load_inplace (needs --previous)", adapter_reused_id, needs_previous=True, adapter_sync=True),
        Plan("merged-bf16-drift", f"merge/unmerge in bf16 for {DRIFT_CYCLES} steps, then push (precision drift, trl #6688)", merged_bf16_drift, adapter_sync=False),
        Plan("rslora-ignored", "an rsLoRA adapter merged with plain alpha/r scaling (needs an rsLoRA adapter)", rslora_ignored, adapter_sync=False),
        Plan("vllm-inplace-same-path", "adapter reloaded in place under the same name and folder, prefix caching on (vLLM #42125; needs --previous)", vllm_inplace_same_path, needs_previous=True, adapter_sync=True),
        Plan("merged-no-cache-reset", "rollouts, then merged weights pushed without reset_prefix_cache()", merged_no_cache_reset, adapter_sync=False),
        Plan("rollout-without-adapter", "adapter loaded, rollouts requested without it (ms-swift #9855, miles #2075)", rollout_without_adapter, adapter_sync=True),
    )
}


def get_plan(name: str) -> Plan:
    """A built-in plan by name, or a custom one as `file.py:function` / `package.module:function`."""
    if name in PLANS:
        return PLANS[name]
    if ":" in name:
        return _custom_plan(name)
    raise BadInput(f"unknown plan {name!r}; known plans: {', '.join(PLANS)}, or FILE.py:FUNCTION (see 'lora-doctor plans')")


def _custom_plan(spec: str) -> Plan:
    source, _, function_name = spec.rpartition(":")
    if not source or not function_name:
        raise BadInput(f"--plan {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION")
    module = _load_module(source, spec)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise BadInput(f"--plan {spec!r}: {source} has no function {function_name!r}")
    try:
        inspect.signature(function).bind(object())
    except TypeError:
        raise BadInput(f"--plan {spec!r}: {function_name}{_signature(function)} must take one argument, the sync handle: def {function_name}(sync)") from None
    except ValueError:
        pass  # a builtin without an introspectable signature: let the call decide
    doc = inspect.getdoc(function) or f"custom plan {spec}"
    return Plan(
        name=spec,
        summary=doc.splitlines()[0],
        function=function,
        needs_previous=getattr(function, "needs_previous", False),
        source=inspect.getsourcefile(function),
    )


def _signature(function) -> str:
    try:
        return str(inspect.signature(function))
    except ValueError:
        return "(...)"


def _load_module(source: str, spec: str):
    path = Path(source)
    try:
        if source.endswith(".py") or path.is_file():
            if not path.is_file():
                raise BadInput(f"--plan {spec!r}: no such file {source}")
            module_spec = importlib.util.spec_from_file_location(f"lora_doctor_plan_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(source)
    except BadInput:
        raise
    except Exception as error:  # the user's code: report its failure in one line
        raise BadInput(f"--plan {spec!r}: cannot load {source} ({type(error).__name__}: {error})") from None
