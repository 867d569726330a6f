"""Command line: parse, call the library, hand the result to a renderer, exit with the contract's code."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import defaults
from .errors import INTERNAL_ERROR_EXIT_CODE, BadInput, LoraDoctorError, memory_problem, one_line, out_of_memory
from .output import save_crash, write_file, write_files

app = typer.Typer(
    help="Catch LoRA weight-sync bugs between an RL trainer and its vLLM rollout engine.\n\n"
    "Exit codes: 0 every phase healthy, 1 a problem was detected, 2 bad input, 3 environment (no usable vLLM, "
    "engine failed, out of memory), 4 internal error (lora-doctor crashed; the traceback is saved to a file).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)

# Options several commands take, declared once so that their help stays the same everywhere.
CHECKPOINT_ARGUMENT = typer.Argument(..., help="PEFT adapter folder or trainer checkpoint (e.g. checkpoint-500/).")
BASE_OPTION = typer.Option(None, "--base", help="Local base model folder (default: base_model_name_or_path from adapter_config.json).")
THRESHOLD_OPTION = typer.Option([], "--threshold", help="Override a threshold, NAME=VALUE (repeatable).")
JSON_OPTION = typer.Option(None, "--json", help="Write the JSON report here ('-' for stdout).")
REPORT_OPTION = typer.Option(None, "--report", help="Write report.json, report.md (paste into an issue) and report.html into this folder.")
EXIT_ZERO_OPTION = typer.Option(False, "--exit-zero", help="Exit 0 even when a problem is found.")
ALL_MODULES_OPTION = typer.Option(False, "--all-modules", help="Show every LoRA module's effective scale, residual and divergence.")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No terminal report, only the exit code (and --json).")


@app.command()
def check(
    checkpoint: Path = CHECKPOINT_ARGUMENT,
    base: Optional[Path] = BASE_OPTION,
    plan: str = typer.Option(defaults.PLAN, "--plan", help="Sync plan to replay: a name from 'lora-doctor plans', or FILE.py:FUNCTION / MODULE:FUNCTION for your own."),
    previous: Optional[Path] = typer.Option(None, "--previous", help="An older checkpoint of the same run: tells a stale adapter from a wrong one."),
    prompts: Optional[Path] = typer.Option(defaults.PROMPTS, "--prompts", help="Prompts file: .jsonl with a \"prompt\" field, or one prompt per line. Default: built-in math questions."),
    max_new_tokens: int = typer.Option(defaults.MAX_NEW_TOKENS, "--max-new-tokens", help="Length of the greedy continuations compared."),
    dtype: Optional[str] = typer.Option(
        defaults.DTYPE,
        "--dtype",
        help="float32 (tight thresholds), bfloat16 or float16. Default: what the trainer's engine computes in: the base's own "
        "dtype; a float32 base in bfloat16 on CUDA (vLLM's LoRA kernels there take no float32), in float32 on the CPU build.",
    ),
    tensor_parallel_size: int = typer.Option(defaults.TENSOR_PARALLEL_SIZE, "--tensor-parallel-size", "-tp", help="vLLM tensor-parallel ranks."),
    kv_cache_gib: Optional[int] = typer.Option(
        defaults.KV_CACHE_GIB,
        "--kv-cache-gib",
        help="KV cache of the engine, in GiB (at least 1), on the CPU build and on CUDA alike. Default: on the CPU build "
        "VLLM_CPU_KVCACHE_SPACE if set, else 1 (the option wins over the variable); on CUDA twice what the prompts need, at least 1.",
    ),
    reference_device: str = typer.Option(
        defaults.REFERENCE_DEVICE,
        "--reference-device",
        help="Where the HF + PEFT reference runs: cpu, cuda, or auto (the GPU when it fits there beside the engine, else "
        "the CPU). The report says where it ran.",
    ),
    threshold: list[str] = THRESHOLD_OPTION,
    engine_option: list[str] = typer.Option(
        [], "--engine-option", help="The trainer's vLLM engine setting, KEY=VALUE (repeatable), e.g. enable_prefix_caching=false. Unset keys take vLLM's defaults (prefix caching on)."
    ),
    json_path: Optional[Path] = JSON_OPTION,
    report_dir: Optional[Path] = REPORT_OPTION,
    exit_zero: bool = EXIT_ZERO_OPTION,
    all_modules: bool = ALL_MODULES_OPTION,
    no_module_read: bool = typer.Option(not defaults.MODULE_READ, "--no-module-read", help="Skip reading the engine's weights per module (logits only)."),
    quiet: bool = QUIET_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the engine's own logs and progress bars (vLLM, torch, transformers) instead of keeping them in a log file."),
    engine_timeout: float = typer.Option(
        defaults.ENGINE_TIMEOUT,
        "--engine-timeout",
        help="The longest, in seconds, the engine may make no progress on lora-doctor's requests (engine start excluded); "
        "past it the check ends with exit 3, naming the stall and the engine log.",
    ),
) -> None:
    """Replay a trainer's sync plan into a real vLLM engine and compare it with HF + PEFT after each phase."""
    from .checker import check as run_check
    from .engine.deadline import check_timeout, watchdog
    from .measure.verdict import Thresholds
    from .output import engine_output_to_log

    check_timeout(engine_timeout)
    _check_output_path(json_path)
    _check_report_dir(report_dir)
    from .environment import vllm_version_note

    if note := vllm_version_note():
        stderr.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    try:
        overrides = _parse_thresholds(threshold)
        Thresholds().override(overrides)  # unknown names refused before anything loads
    except ValueError as error:
        raise BadInput(f"--threshold: {error}") from None
    options = _parse_engine_options(engine_option)
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    with (
        engine_output_to_log(enabled=not verbose) as captured,
        watchdog(engine_timeout, captured.stderr, captured.log),
        Console(file=captured.stderr).status("checking", spinner="dots") as status,
    ):
        report = run_check(
            checkpoint,
            base=base,
            previous=previous,
            plan=plan,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            dtype=dtype,
            threshold_overrides=overrides,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_gib=kv_cache_gib,
            module_read=not no_module_read,
            progress=lambda message: status.update(message),
            engine_options=options,
            reference_device=reference_device,
            engine_timeout=engine_timeout,
        )
    _emit(report, quiet=quiet, all_modules=all_modules, json_path=json_path, report_dir=report_dir)
    raise typer.Exit(0 if exit_zero else report.exit_code)


@app.command()
def report(
    report_json: Path = typer.Argument(..., help="A JSON report written by 'check --json' or 'check --report'."),
    output_format: str = typer.Option("terminal", "--format", "-f", help="terminal, md, html or json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Re-render a saved JSON report (e.g. as Markdown for an issue, or as a self-contained HTML page)."""
    from .report import render_html, render_json, render_markdown, render_terminal
    from .result import Report

    renderers = {"md": render_markdown, "markdown": render_markdown, "html": render_html, "json": render_json}
    if output_format not in (*renderers, "terminal"):
        raise BadInput(f"--format {output_format!r}: use terminal, md, html or json")
    _check_output_path(output, "--output")
    try:
        saved = Report.from_dict(json.loads(report_json.read_text()))
    except FileNotFoundError:
        raise BadInput(f"no such report: {report_json}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{report_json} is not a lora-doctor JSON report ({error})") from None
    if output_format == "terminal" and output is None:
        render_terminal(saved, _stdout_console())
    elif output_format == "terminal":
        console = Console(file=io.StringIO(), width=140)
        render_terminal(saved, console)
        _write(console.file.getvalue(), output)
    else:
        _write(renderers[output_format](saved), output or Path("-"))
    raise typer.Exit(saved.exit_code)


@app.command()
def inspect(
    checkpoint: Path = CHECKPOINT_ARGUMENT,
    base: Optional[Path] = BASE_OPTION,
    max_lora_rank: Optional[int] = typer.Option(None, "--max-lora-rank", help="The engine's max_lora_rank, to check the adapter's rank against."),
    json_path: Optional[Path] = JSON_OPTION,
    exit_zero: bool = EXIT_ZERO_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Pre-flight: what vLLM will refuse, drop or scale differently in this adapter (no engine needed)."""
    from .preflight import inspect_checkpoint
    from .report.preflight import render_preflight_json, render_preflight_terminal

    _check_output_path(json_path)
    report = inspect_checkpoint(checkpoint, base=base, max_lora_rank=max_lora_rank)
    if not quiet:
        render_preflight_terminal(report, stderr if json_path == Path("-") else _stdout_console())
    if json_path is not None:
        _write(render_preflight_json(report), json_path)
    raise typer.Exit(0 if exit_zero else report.exit_code)


@app.command()
def plans() -> None:
    """List the built-in sync plans."""
    from .plans.builtin import PLANS

    console = Console()
    for plan in PLANS.values():
        default = " (default)" if plan.name == defaults.PLAN else ""
        console.print(f"[bold]{plan.name}[/]{default}: {plan.summary}")


@app.command()
def audit(
    export: Path = typer.Argument(..., help="The merged model folder (model.safetensors, or shards with model.safetensors.index.json)."),
    adapter: Path = typer.Option(..., "--adapter", help="The PEFT adapter folder or trainer checkpoint that was merged."),
    base: Optional[Path] = BASE_OPTION,
    threshold: list[str] = THRESHOLD_OPTION,
    json_path: Optional[Path] = JSON_OPTION,
    report_dir: Optional[Path] = REPORT_OPTION,
    exit_zero: bool = EXIT_ZERO_OPTION,
    all_modules: bool = ALL_MODULES_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Verify a merged export (LoRA merged into the base and saved) against its base and adapter, without an engine."""
    from .export_audit import audit as run_audit

    _check_output_path(json_path)
    _check_report_dir(report_dir)
    from .environment import vllm_version_note

    if note := vllm_version_note():
        stderr.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    try:
        overrides = _parse_thresholds(threshold)
    except ValueError as error:
        raise BadInput(f"--threshold: {error}") from None
    with stderr.status("auditing", spinner="dots") as status:
        report = run_audit(export, adapter, base=base, thresholds=overrides, progress=lambda message: status.update(message))
    _emit(report, quiet=quiet, all_modules=all_modules, json_path=json_path, report_dir=report_dir)
    raise typer.Exit(0 if exit_zero else report.exit_code)


def _emit(report, *, quiet: bool, all_modules: bool, json_path: Optional[Path], report_dir: Optional[Path]) -> None:
    """The terminal report (on stderr when the JSON goes to stdout), the JSON, the report folder.

    Everything is rendered before the first file is written: a renderer that fails (exit 4) leaves
    the files of an earlier run as they were, never a report.json of this run that says otherwise.
    """
    from .report import render_json, render_terminal

    json_text = render_json(report) if json_path is not None else None
    folder_texts = _report_dir_texts(report) if report_dir is not None else None
    if not quiet:
        render_terminal(report, stderr if json_path == Path("-") else _stdout_console(), all_modules=all_modules)
    if json_text is not None:
        _write(json_text, json_path)
    if folder_texts is not None:
        write_files(report_dir, folder_texts)


def _write(text: str, path: Path) -> None:
    """Write to a file (whole, or not at all), or to stdout for '-'."""
    if path == Path("-"):
        sys.stdout.write(text)
    else:
        write_file(path, text)


def _stdout_console() -> Console:
    # Piped output (CI logs, bug reports) keeps the whole table rather than rich's 80-column default.
    console = Console()
    return console if console.is_terminal else Console(width=140)


def _check_output_path(path: Optional[Path], option: str = "--json") -> None:
    if path is None or path == Path("-"):
        return
    if path.is_dir():
        raise BadInput(f"{option} {path} is a folder; give a file path")
    if not path.parent.is_dir():
        raise BadInput(f"{option} {path}: folder {path.parent} does not exist")


def _check_report_dir(path: Optional[Path]) -> None:
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise BadInput(f"--report {path} is a file; give a folder")
    if not path.exists() and not path.parent.is_dir():
        raise BadInput(f"--report {path}: folder {path.parent} does not exist")


def _report_dir_texts(report) -> dict[str, str]:
    from .report import render_html, render_json, render_markdown

    return {"report.json": render_json(report), "report.md": render_markdown(report), "report.html": render_html(report)}


def _parse_thresholds(items: list[str]) -> dict[str, float]:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"expected NAME=VALUE with a number, got {item!r}") from None
        if not sep:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
    return values


def _parse_engine_options(items: list[str]) -> dict:
    """KEY=VALUE → {key: value}; a value reads as a bool (true/false), an int, a float, else text."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--engine-option: expected KEY=VALUE, got {item!r}")
        options[key.strip()] = _option_value(value.strip())
    return options


def _option_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    """Entry point: known errors become one line on stderr and their exit code."""
    import warnings

    # Deprecation noise from the engine's dependencies is not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        # Outside standalone mode the command's exit code is returned instead of exiting.
        code = app(standalone_mode=False)
    except LoraDoctorError as error:
        _fail(error, getattr(error, "engine_log", None))
    except Terminated:
        stderr.print("terminated")
        sys.exit(TERMINATED_EXIT_CODE)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
    except Exception as error:
        # Usage errors (unknown option, missing argument) come from typer's bundled click.
        if hasattr(error, "show") and isinstance(getattr(error, "exit_code", None), int):
            error.show()
            sys.exit(2 if error.exit_code != 0 else 0)
        if out_of_memory(error):  # wherever it happens, not enough memory is the environment's (exit 3)
            _fail(memory_problem("run lora-doctor", error), getattr(error, "engine_log", None))
        crash = save_crash(error)
        stderr.print(
            f"[bold red]internal error:[/] {escape(type(error).__name__)}: {escape(one_line(error))} — lora-doctor crashed; "
            f"the full traceback is in {escape(str(crash))} (please attach it to a bug report)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(INTERNAL_ERROR_EXIT_CODE)
    sys.exit(code if isinstance(code, int) else 0)


# A shell's code for a process ended by SIGTERM (128 + 15), kept for a command that cleaned up first.
TERMINATED_EXIT_CODE = 143


class Terminated(BaseException):
    """SIGTERM (`timeout`, a job scheduler, a CI run being cancelled), raised where the command is:
    every clean-up on the way out runs (the engine's folder, its log, adapters the plan wrote), where
    the signal's default action would leave them in the temporary folder. A BaseException, as Ctrl-C's
    KeyboardInterrupt is, so that no `except Exception` takes it for an error; not a KeyboardInterrupt,
    which typer turns into a silent exit 130."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def run() -> None:
    """The `lora-doctor` command: `main`, then the process ends at once with its exit code. The engine
    a command built is left to the process's end rather than shut down (its files are removed all the
    same): nothing of it outlives the process, and the exit does in no time what a shutdown and the
    interpreter's teardown take seconds for."""
    # The reference forward and the vLLM engine share this process's cores. With OpenMP's default
    # active waiting, idle worker threads spin and a tiny model's forward was measured 300x slower
    # (0.65 s instead of 2 ms) on a busy 2-core machine; passive waiting avoids that. Read by OpenMP
    # when torch loads (the import below is the first), so set here, for the command's own process
    # only: importing the library sets nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .engine.driver import leave_engines_to_process_exit

    leave_engines_to_process_exit()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _fail(error: LoraDoctorError, log) -> None:
    """One line and the error's exit code; an environment problem points to the engine's log."""
    where = f" (engine log: {log})" if log is not None and error.exit_code == 3 else ""
    stderr.print(f"[bold red]error:[/] {escape(str(error))}{escape(where)}", highlight=False, soft_wrap=True)
    sys.exit(error.exit_code)
