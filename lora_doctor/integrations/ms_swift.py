"""ms-swift's GRPO trainer with a colocated vLLM engine (`--vllm_mode colocate`), read from ms-swift 4.0's source.

What ms-swift does, and what the probe therefore uses:
- the colocated engine wrapper is `trainer.engine`; the vLLM engine it drives is a `vllm.LLMEngine`
  (V1) at `trainer.engine.engine`, built with the `--vllm_engine_kwargs` JSON as extra arguments
  (so `max_logprobs` and the worker extension come from the command line);
- with `--vllm_enable_lora true` the engine holds at most one adapter (`max_loras=1`) and every
  rollout is generated with a `LoRARequest` for the first id in `engine.list_loras()`, none while no
  adapter is loaded: `loaded_lora_request` rebuilds exactly that request;
- weights are synced when a generation batch is made: every `steps_per_generation × num_iterations`
  optimizer steps, starting with the first; `_move_model_to_vllm` then calls `reset_prefix_cache()`;
- the probe uses the `lora_request` ms-swift's own rollouts passed to the engine's `add_request`
  (recorded there); `loaded_lora_request` stands in until a rollout has been seen.

A run the probe stopped exits 1 (a failed verdict), 2 or 3 (the probe could not run: bad input, the
environment), with one line on stderr, as the `lora-doctor` command does. Switch the probe on from the command line with one option (printed by
`python -m lora_doctor.integrations.ms_swift`): ms-swift imports the files named by
`--external_plugins`, and lora-doctor's adds its callback to the run.

With LORA_DOCTOR_WATCH=1 the plugin watches every step instead (`ms_swift_watch`): the engine's,
the policy's and the base's log-probs of the step's sampled tokens go to `lora_doctor.watch.Watch`,
one full probe confirms the engine after the first sync, and a flagged step is probed at once on its
own prompts; one JSON line per step to LORA_DOCTOR_WATCH_LOG. The periodic probe is then off unless
LORA_DOCTOR_EVERY_N_STEPS asks for it (a step the watch already probed is not probed twice).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..callback import LoraDoctorCallback, figures
from ..errors import INTERNAL_ERROR_EXIT_CODE, BadInput, LoraDoctorError, ProblemDetected, one_line
from ..live import RouteRecorder, probe_at_step
from ..output import save_crash, write_file

CALLBACK_NAME = "lora_doctor"
PLUGIN = Path(__file__).resolve().parent / "swift_plugin" / "lora_doctor_swift.py"
# Options without a command-line flag of their own (ms-swift parses its flags strictly).
PROMPTS_ENV = "LORA_DOCTOR_PROMPTS"
EVERY_ENV = "LORA_DOCTOR_EVERY_N_STEPS"
# A JSON file that gets every probe's full result (the logged figures are numbers only).
RESULTS_ENV = "LORA_DOCTOR_RESULTS"
# "1": watch every step (lora_doctor.watch), its JSON lines to LORA_DOCTOR_WATCH_LOG.
WATCH_ENV = "LORA_DOCTOR_WATCH"


def loaded_lora_request(engine):
    """The request ms-swift generates with: the first adapter the engine has loaded, or None (merged/base weights)."""
    from vllm.lora.request import LoRARequest

    ids = list(engine.list_loras())
    if not ids:
        return None
    # ms-swift's own request for a loaded adapter; the path is never read for an id already loaded.
    return LoRARequest(lora_name=f"{ids[0]}", lora_int_id=ids[0], lora_path="dummy_lora_path")


class SwiftProbe(LoraDoctorCallback):
    """The callback ms-swift instantiates from its `callbacks_map`.

    ms-swift 4.0.1 calls it with the trainer, 4.0.2 with (args, trainer).
    """

    def __init__(self, *args):
        trainer = args[-1]
        if not getattr(trainer.args, "use_vllm", False) or trainer.args.vllm_mode != "colocate":
            exit_with(BadInput("lora-doctor's ms-swift probe needs --use_vllm true --vllm_mode colocate: it reads the trainer's own engine"))
        watching = os.environ.get(WATCH_ENV, "0")
        if watching not in ("0", "1"):
            exit_with(BadInput(f"{WATCH_ENV} must be 1 (watch every step) or 0, got {watching!r}"))
        sync_every = trainer.args.steps_per_generation * getattr(trainer, "num_iterations", 1)
        every = int(os.environ.get(EVERY_ENV, sync_every))
        # Watching, the full probe runs at the start and on flagged steps only, unless asked for periodically too.
        self.periodic = watching == "0" or EVERY_ENV in os.environ
        super().__init__(
            trainer,
            lambda: trainer.engine.engine,
            lora_request=lambda: loaded_lora_request(trainer.engine.engine),
            every_n_steps=every,
            route=lambda: RouteRecorder(trainer.engine.engine, "add_request"),
            prompts=os.environ.get(PROMPTS_ENV) or None,
        )
        self.results_path = os.environ.get(RESULTS_ENV)
        self.swift_watch = None
        if watching == "1":
            from .ms_swift_watch import SwiftWatch

            self.swift_watch = SwiftWatch(
                trainer, probe=self._watch_probe, log=self._log, stop_on_failure=self.stop_on_failure, notice=notice, fail=fail
            )

    @property
    def watch(self):
        """The `lora_doctor.watch.Watch` of the run (None unless LORA_DOCTOR_WATCH=1; built when training begins)."""
        return self.swift_watch.watch if self.swift_watch is not None else None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.swift_watch is not None:
            self.swift_watch.start()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if self.periodic and not any(result.name == f"step-{step}" for result in self.results):
            probes = len(self.results)
            try:
                control = super().on_pre_optimizer_step(args, state, control, **kwargs)
            except LoraDoctorError as error:  # the probe could not run: bad input (2) or the environment (3)
                exit_with(error)
            if len(self.results) > probes:
                self._results_written()
        if self.watch is not None and self.watch.should_stop:
            control.should_training_stop = True
        return control

    def _watch_probe(self, step: int, prompts):
        """The watch's full probe (start-up, escalation) on ms-swift's engine: the route its rollouts named, `prompts` or the configured ones.

        A step already probed (the start-up probe, then a flag on the same step) is not probed twice.
        """
        done = [result for result in self.results if result.name == f"step-{step}"]
        if done:
            return done[-1]
        result, source = probe_at_step(
            self.trainer.engine.engine,
            self.trainer.model,
            step,
            recorder=self._recorder,
            given=lambda: loaded_lora_request(self.trainer.engine.engine),
            what="the watch's probe",
            prompts=prompts if prompts is not None else self.prompts,
            max_new_tokens=self.max_new_tokens,
            module_read=self.module_read,
            engine_timeout=self.engine_timeout,
        )
        self.routes.append(source)
        self.results.append(result)
        self._log(figures(result))
        self._results_written()
        return result

    def _results_written(self) -> None:
        if self.results_path:
            write_file(self.results_path, json.dumps([asdict(result) for result in self.results]))

    def on_train_end(self, args, state, control, **kwargs):
        # ms-swift ends a stopped run as a finished one (exit 0): a script that gates on the exit code
        # must see the problem. Raised after the trainer's loop, so ms-swift still saves its state.
        if self.swift_watch is not None:
            self.swift_watch.close()
        super().on_train_end(args, state, control, **kwargs)  # the engine's add_request as ms-swift made it
        # A probe that measured nothing (a sleeping or stalled engine) is no failed sync: not exit 1.
        failed = [result for result in self.results if result.failed]
        if self.stop_on_failure and failed:
            exit_with(ProblemDetected(f"lora-doctor stopped the run at {failed[0].name}: {failed[0].verdict} (α = {failed[0].effective_scale:.3f})"))
        return control


def notice(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fail(error: BaseException):
    """End ms-swift's process on an error of lora-doctor's: its own exit code, or 4 with the traceback in a file."""
    if isinstance(error, LoraDoctorError):
        exit_with(error)
    crash = save_crash(error)
    print(
        f"internal error: {type(error).__name__}: {one_line(error)} — lora-doctor crashed; the full traceback is in {crash}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(INTERNAL_ERROR_EXIT_CODE)


def exit_with(error: LoraDoctorError):
    """End ms-swift's process with the error's one line and exit code (SystemExit: its `finally` blocks still run)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(error.exit_code)


if __name__ == "__main__":
    print(PLUGIN)
