"""A real vLLM engine for the base model, and the sync operations a trainer performs on it."""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput, EnvironmentProblem, LoraDoctorError, engine_problem, memory_problem, one_line, out_of_memory
from .compat import keeping_parallel_state, let_vllm_scan_llvmlite, parallel_state_initialized
from .deadline import DEFAULT_ENGINE_TIMEOUT, EngineUnavailable, Stall, check_timeout, engine_call
from .platform import PIN_V1, current_platform, device_memory, memory_plan

WORKER_EXTENSION = "lora_doctor.engine.worker.LoraDoctorWorker"
INSTALL_HINT = "install the engine with: pip install 'lora-doctor[cpu]' (CPU) or 'lora-doctor[gpu]'"
# One GiB of KV cache holds tens of thousands of tokens of a small model: far more than a check's prompts.
DEFAULT_KV_CACHE_GIB = 1


@dataclass(frozen=True)
class EngineConfig:
    """How the engine is built. The KV cache is sized to the prompts, never left at the default."""

    dtype: str = "float32"
    max_lora_rank: int = 16
    max_model_len: int = 512
    tensor_parallel_size: int = 1
    # GiB of CPU KV cache: vLLM's CPU default reserves most of the machine's memory. None: the
    # environment's VLLM_CPU_KVCACHE_SPACE if set, else DEFAULT_KV_CACHE_GIB; a value wins over it.
    kv_cache_gib: int | None = None
    seed: int = 0
    # For the memory plan on CUDA (engine/platform.py): the base's weights at the engine's dtype, and
    # the KV cache the check's prompts and continuations take.
    weights_bytes: int = 0
    kv_bytes_needed: int = 0
    # The trainer's own engine settings (`--engine-option KEY=VALUE`): vLLM's keyword arguments.
    # What they leave out takes vLLM's default, as in the trainer (prefix caching on).
    options: dict = field(default_factory=dict)


# What lora-doctor sets itself, for the measurement to be possible; the trainer's value would not
# change what its rollouts compute (dtype and tensor_parallel_size have options of their own).
RESERVED_OPTIONS = frozenset(
    {"model", "dtype", "enable_lora", "max_lora_rank", "max_logprobs", "worker_extension_cls", "tensor_parallel_size", "seed", "enforce_eager"}
)


def engine_defaults(config: EngineConfig) -> dict:
    """The keyword arguments of the engine lora-doctor builds, before the trainer's options."""
    return {
        "dtype": config.dtype,
        "enable_lora": True,
        "max_lora_rank": config.max_lora_rank,
        "max_loras": 2,
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": config.tensor_parallel_size,
        "enforce_eager": True,
        "max_logprobs": -1,
        "seed": config.seed,
        "worker_extension_cls": WORKER_EXTENSION,
    }


def check_engine_options(options: dict) -> None:
    """Refuse an option vLLM does not know or one lora-doctor must set itself (exit 2)."""
    import dataclasses

    vllm = import_vllm()
    known = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    for key in options:
        if key in RESERVED_OPTIONS:
            raise BadInput(f"--engine-option {key}: lora-doctor sets {key} itself (see --dtype, --tensor-parallel-size)")
        if key not in known:
            raise BadInput(f"--engine-option {key}: not an option of vLLM's engine (vllm.EngineArgs)")


@contextmanager
def _engine_environment(config: EngineConfig, files: Path, memory: dict[str, str]) -> Iterator[None]:
    """The variables vLLM reads while an engine is built, set for that time only.

    The caller's process is left as found: `os.environ` is restored when the engine is built, and so
    is vLLM's cache of it (`vllm.envs`, cached for the whole process once an engine has started), so
    that an engine the caller builds later, in the same process, is built with the caller's settings.
    The variables vLLM sets for itself and reads again were read while the engine is built in the
    cases checked (VLLM_DIST_IDENT by the CPU worker's communicator) or are set again when read (the
    multimodal cache's buffer name, `envs.get_env_or_set_default`).
    """
    # The engine runs in this process so that weights and LoRA buffers are reachable directly.
    wanted = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # The engine's own start-up chatter (and its workers', under tensor parallelism) would bury the report.
    wanted["VLLM_LOGGING_LEVEL"] = "ERROR"
    # The sockets between the engine's processes (tensor-parallel workers) go to the engine's own
    # folder, removed when it closes: vLLM leaves them in the temporary folder otherwise.
    wanted["VLLM_RPC_BASE_PATH"] = str(files)
    if config.tensor_parallel_size > 1:
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = _thread_binding(config.tensor_parallel_size)
    setting = {name: value for name, value in wanted.items() if name not in os.environ}
    # The memory plan's variables (the CPU build's KV cache), and the model runner the capture needs.
    setting.update(memory)
    setting.update(PIN_V1)
    # vLLM sets variables of its own as it builds an engine (VLLM_WORKER_MULTIPROC_METHOD=spawn,
    # NUMEXPR_MAX_THREADS, TORCHINDUCTOR_*...): every variable is restored, not only lora-doctor's.
    saved = dict(os.environ)
    import vllm.envs as vllm_envs

    cached = vllm_envs.__getattr__ if vllm_envs._is_envs_cache_enabled() else None
    vllm_envs.disable_envs_cache()  # an earlier engine's cache would hide the values set here
    os.environ.update(setting)
    try:
        yield
    finally:
        _restore_environment(saved)
        # The engine caches vllm.envs as it starts: forget that cache, or restore the caller's.
        vllm_envs.disable_envs_cache()
        if cached is not None:
            vllm_envs.__getattr__ = cached


def _restore_environment(saved: dict[str, str]) -> None:
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update({name: value for name, value in saved.items() if os.environ.get(name) != value})


def _hold_process_state() -> Callable[[], None]:
    """What an in-process engine changes in the caller's process for as long as it runs, restored by
    the returned function when it is closed: vLLM's logger, kept at ERROR meanwhile (unless the
    caller chose a level with VLLM_LOGGING_LEVEL, e.g. `--verbose`); torch's thread count and
    `torch.set_num_threads`, which vLLM's CPU worker replaces with a function that refuses; and the
    variables set while it ran (torch's compiled kernels set _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR)."""
    import vllm.logger as vllm_logging

    logger = logging.getLogger("vllm")
    # The engine configures vLLM's logging as it starts (its handler, level and record factory).
    logging_state = (logger.level, list(logger.handlers), logger.propagate, logging.getLogRecordFactory(), vllm_logging._last_configured_logging_config)
    if "VLLM_LOGGING_LEVEL" not in os.environ:
        logger.setLevel(logging.ERROR)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    environment = dict(os.environ)

    def restore() -> None:
        _restore_environment(environment)
        level, handlers, propagate, factory, configured = logging_state
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logging.setLogRecordFactory(factory)
        vllm_logging._last_configured_logging_config = configured
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)

    return restore


def _thread_binding(ranks: int) -> str:
    """One contiguous core set per rank, e.g. "0|1" for two ranks on two cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per_rank = max(1, len(cores) // ranks)
    sets = []
    for rank in range(ranks):
        chunk = cores[rank * per_rank : (rank + 1) * per_rank] or [cores[rank % len(cores)]]
        sets.append(f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else str(chunk[0]))
    return "|".join(sets)


def import_vllm():
    """Import vLLM or explain, in one line, how to get it (exit 3)."""
    let_vllm_scan_llvmlite()
    try:
        import vllm
        from vllm.lora.request import LoRARequest  # noqa: F401
    except Exception as error:
        if out_of_memory(error):
            raise memory_problem("import vLLM", error) from None
        raise EnvironmentProblem(f"vLLM is not usable here ({type(error).__name__}: {error}); {INSTALL_HINT}") from None
    return vllm


# lora-doctor's request ids, unique in the process: an engine attached by several probes never sees
# one id twice, and a trainer's requests (vllm.LLM numbers its own) never share one.
_REQUEST_IDS = itertools.count(1)

# Engines left to the end of the process instead of shut down (see `leave_engines_to_process_exit`).
_LEFT_TO_PROCESS_EXIT: list | None = None


def leave_engines_to_process_exit() -> None:
    """From now on, an engine lora-doctor built in this process is not shut down when closed (its
    files are still removed), but kept until the process ends, which must be at once (`os._exit`,
    as the `lora-doctor` command does): a graceful shutdown of an in-process engine costs about a
    second (vLLM collects garbage and tears its process groups down) that the process's end does
    for free. An engine with processes of its own (tensor-parallel workers) is always shut down."""
    global _LEFT_TO_PROCESS_EXIT
    if _LEFT_TO_PROCESS_EXIT is None:
        _LEFT_TO_PROCESS_EXIT = []


def _has_child_processes() -> bool:
    import psutil

    return bool(psutil.Process().children())


class Engine:
    """One vLLM engine per check, with LoRA enabled, reused across sync phases.

    `timeout`: the longest, in seconds, the engine may make no progress on lora-doctor's requests
    (see engine/deadline.py); past it they are aborted and `EngineStalled` is raised (exit 3).
    """

    def __init__(self, base_dir: Path, config: EngineConfig, timeout: float = DEFAULT_ENGINE_TIMEOUT):
        self.timeout = check_timeout(timeout, "engine_timeout")
        vllm = import_vllm()
        self._adapter_ids = 0
        self._owned = True
        # Another in-process engine (the trainer's) made vLLM's parallel state: closing keeps it.
        self._shared_parallel_state = parallel_state_initialized()
        self._restore_process = _hold_process_state()
        # A short name (lora-doctor's engine): vLLM's tensor-parallel sockets are made inside it, with a
        # 36-character name, and a socket's path must fit in 107 characters.
        self._files = tempfile.TemporaryDirectory(prefix="lde-")
        try:
            platform = current_platform()
            total, free = device_memory(platform)
            memory = memory_plan(
                platform,
                config.kv_cache_gib,
                environment_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                default_cpu_gib=DEFAULT_KV_CACHE_GIB,
                weights_bytes=config.weights_bytes,
                kv_bytes_needed=config.kv_bytes_needed,
                device_total=total,
                device_free=free,
            )
            with _engine_environment(config, Path(self._files.name), memory.environment):
                self.llm = vllm.LLM(model=str(base_dir), **{**engine_defaults(config), **memory.engine_args, **config.options})
            self._batch_prompt_logprobs = self._can_batch_prompt_logprobs()
        except BaseException as error:
            self.close()
            if isinstance(error, LoraDoctorError) or not isinstance(error, Exception):
                raise
            if out_of_memory(error):
                raise memory_problem("start the vLLM engine", error) from None
            raise EnvironmentProblem(f"the vLLM engine failed to start: {one_line(error)}") from None

    @classmethod
    def attach(cls, llm, timeout: float = DEFAULT_ENGINE_TIMEOUT) -> Engine:
        """Wrap an engine the caller already has (inside a trainer); `close` leaves it running.

        `llm` is a `vllm.LLM` (TRL) or the `vllm.LLMEngine` it wraps (ms-swift's colocated engine),
        built with or without LoRA and with or without lora-doctor's worker extension.
        """
        engine = cls.__new__(cls)
        engine.timeout = check_timeout(timeout, "engine_timeout")
        engine.llm = llm
        engine._adapter_ids = 0
        engine._owned = False
        engine._restore_process = lambda: None
        engine._files = None
        max_logprobs = engine.core.model_config.max_logprobs
        if max_logprobs != -1 and max_logprobs < engine.vocab_size:
            raise BadInput(
                f"the engine was built with max_logprobs={max_logprobs}; lora-doctor compares full-vocabulary "
                "log-probs: build it with max_logprobs=-1 (see the README's trainer recipes)"
            )
        engine._batch_prompt_logprobs = engine._can_batch_prompt_logprobs()
        return engine

    @property
    def core(self):
        """The `vllm.LLMEngine` (V1) behind the handle: a `vllm.LLM` keeps one in `llm_engine`."""
        return getattr(self.llm, "llm_engine", self.llm)

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine was built with `enable_lora` (it has LoRA slots to read)."""
        return self.core.vllm_config.lora_config is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.core.model_config.dtype

    @property
    def quantization(self) -> str | None:
        """The quantization method the engine runs its weights in (None: unquantized)."""
        return self.core.model_config.quantization

    def _can_batch_prompt_logprobs(self) -> bool:
        """Whether several prompts' log-probs may share one request batch.

        vLLM-CPU 0.32 fails (`einsum(): subscript b has size 2 ...` in `bgmv_shrink`) on batched
        prompt log-probs when the model's logits processor is LoRA-wrapped (Llama lists `lm_head`
        among its LoRA modules; Qwen2 does not), even without a LoRA request.
        """
        if not self.has_worker_extension:
            return False
        modules = self.rpc("lora_doctor_modules")[0]["modules"]
        return "LogitsProcessorWithLoRA" not in modules.values()

    @property
    def has_worker_extension(self) -> bool:
        """Whether the engine can report what it holds per module (built with lora-doctor's extension)."""
        config = self.core.vllm_config.parallel_config
        return getattr(config, "worker_extension_cls", "") == WORKER_EXTENSION

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """A full sync: push base-named weights into the engine (also drops its loaded adapters).

        `weights` goes to the workers as it is: a re-iterable that reads one weight at a time
        (`StreamedWeights`, `MergedWeights`) streams, and pickles small to workers in other processes.
        A one-shot iterator (a generator) cannot be pickled, so it is gathered into a list first.
        """
        if isinstance(weights, Iterator):
            weights = list(weights)
        from ..adapter.weight_files import freed_tensors_returned

        with engine_operation("load weights (a full sync)"), freed_tensors_returned():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def reload_from_disk(self) -> None:
        """What sleep-mode wake-up does: the engine reloads its base weights from its model folder."""
        with engine_operation("reload its weights from disk"):
            self.llm.collective_rpc("reload_weights")

    def add_adapter(self, path: Path, int_id: int, load_inplace: bool = False, source: Path | None = None, rank: int | None = None):
        """An adapter sync: register a LoRA adapter folder under `int_id`; returns its request.

        `source` is the folder the user named when `path` is a copy of it: messages name `source`.
        `rank` is the adapter's largest LoRA rank, from its opened spec (the folder is not read here):
        one above the engine's is refused in lora-doctor's words; None leaves it to vLLM.
        """
        from vllm.lora.request import LoRARequest

        self._adapter_ids = max(self._adapter_ids, int_id)
        named = path if source is None else source
        if rank is not None:
            self._check_rank(rank, named)
        request = LoRARequest(f"lora-doctor-{int_id}", int_id, str(path), load_inplace=load_inplace)
        try:
            self.core.add_lora(request)
        except Exception as error:
            if out_of_memory(error):
                raise memory_problem(f"load the adapter {named}", error) from None
            if adapter_refused(error):
                raise BadInput(f"the engine refused the adapter {named}: {one_line(error)} (see 'lora-doctor inspect')") from None
            raise engine_problem(f"load the adapter {named}", error) from None
        return request

    def _check_rank(self, rank: int, named: Path) -> None:
        """Refuse, in lora-doctor's words, an adapter above the rank the engine was built for."""
        lora_config = self.core.vllm_config.lora_config
        if lora_config is None:
            return  # vLLM's own refusal names the missing enable_lora
        if rank > lora_config.max_lora_rank:
            raise BadInput(
                f"the adapter {named} has LoRA rank {rank}, above the engine's max_lora_rank {lora_config.max_lora_rank} "
                "(sized for the checked adapter and --previous): pass it as --previous to size the engine for it"
            )

    def reset_prefix_cache(self) -> None:
        """Forget every cached KV block (what a trainer calls after each weight or adapter sync)."""
        with engine_operation("reset its prefix cache"):
            self.core.reset_prefix_cache()

    def loaded_adapters(self) -> set[int]:
        """The ids of the adapters the engine holds now."""
        with engine_operation("list its loaded adapters"):
            return set(self.core.list_loras())

    @property
    def options(self) -> dict:
        """The settings the engine runs with that decide what its rollouts read and batch."""
        config = self.core.vllm_config
        lora = config.lora_config
        return {
            "enable_prefix_caching": bool(config.cache_config.enable_prefix_caching),
            "block_size": config.cache_config.block_size,
            "enable_chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
            "max_num_seqs": config.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "max_loras": lora.max_loras if lora is not None else None,
            "max_model_len": config.model_config.max_model_len,
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
        }

    def decode(self, prompts: list[list[int]], max_new_tokens: int, lora_request=None, skip_cache: bool = False) -> list[tuple[list[int], torch.Tensor]]:
        """Greedy rollouts of each prompt, as a trainer generates them, reading the prefix cache as it
        stands (unless `skip_cache`): per prompt, the generated tokens and their `(tokens, vocab)` float32
        log-probs over the full vocabulary (vLLM's raw log-probs, before any sampling transform)."""
        from vllm import SamplingParams

        if self.has_worker_extension:
            # One batch, as the rollouts are generated (with a LoRA-wrapped logits processor too: the
            # batching failure of `_can_batch_prompt_logprobs` is prompt log-probs' only); one request per
            # prompt where a batch's rows cannot be told apart (each decode step's row is then that prompt's).
            captured = self._captured_decode_batch(prompts, max_new_tokens, lora_request, skip_cache)
            if captured is None:
                captured = [self._captured_decode_batch([ids], max_new_tokens, lora_request, skip_cache) for ids in prompts]
                captured = [c[0] if c is not None else None for c in captured]
            if all(c is not None for c in captured):
                return captured
        params = SamplingParams(
            max_tokens=max_new_tokens, temperature=0.0, logprobs=-1, flat_logprobs=True, detokenize=False, skip_reading_prefix_cache=skip_cache
        )
        outputs = self._generate(prompts, params, lora_request)
        return [(list(o.outputs[0].token_ids), _dense_logprobs(o.outputs[0].logprobs, self.vocab_size)) for o in outputs]

    def _captured_decode_batch(self, prompts: list[list[int]], max_new_tokens: int, lora_request, skip_cache: bool) -> list[tuple[list[int], torch.Tensor]] | None:
        """The prompts' rollouts, generated together, with their log-prob rows read on the worker (see
        `capture.py`). The requests ask only for each generated token's own log-prob: a captured row
        belongs to the one request whose next generated token and log-prob it holds. None when a row
        fits no request or several (two prompts generating the same token with the same log-prob)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=0, detokenize=False, skip_reading_prefix_cache=skip_cache)
        if not all(self.rpc("lora_doctor_capture_start")):
            return None
        try:
            outputs = self._generate(prompts, params, lora_request)
        finally:
            captured = self.rpc("lora_doctor_capture_stop")[0]
        completions = [output.outputs[0] for output in outputs]
        if captured is None or any(completion.logprobs is None for completion in completions):
            return None
        tokens = [list(completion.token_ids) for completion in completions]
        rows: list[list[torch.Tensor]] = [[] for _ in prompts]
        for targets, table in captured:
            targets = targets.reshape(-1)
            if table.shape[0] != targets.numel():
                return None
            for row, token in enumerate(targets.tolist()):
                value = table[row, token].item()
                owners = [
                    index
                    for index, completion in enumerate(completions)
                    if len(rows[index]) < len(tokens[index])
                    and tokens[index][len(rows[index])] == token
                    and completion.logprobs[len(rows[index])][token].logprob == value
                ]
                if len(owners) != 1:
                    return None
                rows[owners[0]].append(table[row, : self.vocab_size])
        if any(len(own) != len(generated) for own, generated in zip(rows, tokens)):
            return None
        return [(generated, torch.stack(own) if own else torch.empty(0, self.vocab_size)) for generated, own in zip(tokens, rows)]

    def new_adapter_id(self) -> int:
        """An adapter id above every id this engine has seen, so a fresh sync is never served from its cache."""
        self._adapter_ids += 1
        return self._adapter_ids

    def prompt_logprobs(self, prompts: list[list[int]], lora_request=None) -> list[torch.Tensor]:
        """Per prompt, `(len-1, vocab)` float32 log-probs of every next token over the full vocabulary.

        Memory is that of the tables themselves: with lora-doctor's worker extension they are the
        engine's own tensors (see `capture.py`); without it vLLM's per-entry Python lists are read
        into one tensor per prompt, which costs ~130 bytes per entry while they exist. Callers pass
        a chunk of their prompts at a time.
        """
        if self.has_worker_extension:
            # Batched when the engine allows it; one prompt per request if a batch's chunks did not line up.
            for batch in dict.fromkeys((self._batch_prompt_logprobs, False)):
                tables = self._captured_prompt_logprobs(prompts, lora_request, batch)
                if tables is not None:
                    return tables
        outputs = self._prompt_requests(prompts, -1, lora_request, self._batch_prompt_logprobs)
        return [_dense_prompt_logprobs(o.prompt_logprobs, self.vocab_size) for o in outputs]

    def _captured_prompt_logprobs(self, prompts: list[list[int]], lora_request, batch: bool) -> list[torch.Tensor] | None:
        if not all(self.rpc("lora_doctor_capture_start")):
            return None
        try:
            outputs = self._prompt_requests(prompts, 0, lora_request, batch)
        finally:
            captured = self.rpc("lora_doctor_capture_stop")[0]
        return _captured_tables(captured, prompts, outputs, self.vocab_size)

    def _prompt_requests(self, prompts: list[list[int]], prompt_logprobs: int, lora_request, batch: bool) -> list:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=prompt_logprobs, flat_logprobs=True, detokenize=False)
        if batch:
            return self._generate(prompts, params, lora_request)
        return [output for ids in prompts for output in self._generate([ids], params, lora_request)]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, lora_request=None) -> list[list[int]]:
        """Greedy continuation of each prompt (stops at end-of-sequence, as rollouts do)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, detokenize=False)
        return [list(o.outputs[0].token_ids) for o in self._generate(prompts, params, lora_request)]

    def rpc(self, method: str, *args):
        """Call a method of lora-doctor's worker extension on every rank; one result per rank."""
        try:
            with engine_call(method):
                return self.llm.collective_rpc(method, args=args)
        except LoraDoctorError:
            raise
        except Exception as error:  # a worker's failure comes back as whatever the executor wraps it in
            if out_of_memory(error):
                raise memory_problem(f"run {method} on the engine's worker", error) from None
            raise EnvironmentProblem(f"the engine's worker failed in {method}: {one_line(error)}") from None

    @property
    def kv_cache_gib(self) -> float | None:
        """The KV cache the engine was given, in GiB (None where the engine sizes it itself)."""
        size = self.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
        return size / (1 << 30) if size else None

    @property
    def tensor_parallel_size(self) -> int:
        """The ranks the engine splits the model across, as it was built (not as it was asked)."""
        return self.core.vllm_config.parallel_config.tensor_parallel_size

    @property
    def vocab_size(self) -> int:
        return self.core.model_config.get_vocab_size()

    def unavailable(self) -> str | None:
        """Why the engine cannot serve a request now (None: it can). A sleeping engine (TRL's
        `vllm_enable_sleep_mode`, ms-swift's `--sleep_level`) has its scheduler paused: a request
        would be queued and never stepped until the trainer wakes it."""
        query = getattr(self.core, "is_sleeping", None)
        if query is None:  # an engine from before sleep mode: it has no paused state to be in
            return None
        try:
            asleep = query()
        except Exception as error:  # every client of vLLM 0.32 answers it: one that fails is not sent requests
            return f"it did not answer whether it sleeps ({one_line(error)})"
        if asleep:
            return "the engine is asleep (its scheduler is paused, as vLLM's sleep mode leaves it): a request would wait until it wakes"
        return None

    def _generate(self, prompts: list[list[int]], params, lora_request):
        from vllm.inputs import TokensPrompt

        reason = self.unavailable()
        if reason is not None:
            raise EngineUnavailable(f"lora-doctor sent no request: {reason}")
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        with engine_operation("generate", timed=False):
            return self._generate_on_core(requests, params, lora_request)

    def _generate_on_core(self, requests, params, lora_request):
        """What `vllm.LLM.generate` does, with a deadline: queue the requests on the `LLMEngine`, step
        it until they finish. No progress on them for `timeout` seconds (a request the engine dropped,
        an engine that stopped stepping): they are aborted and `EngineStalled` raised. Outputs of the
        caller's own requests (a trainer's) that finish meanwhile are handed back to its next step."""
        from vllm.sampling_params import RequestOutputKind

        core = self.core
        params = params.clone()
        params.output_kind = RequestOutputKind.FINAL_ONLY  # as vllm.LLM asks: one output per request
        order: dict[str, int] = {}
        external: dict[int, str] = {}
        finished: dict[int, object] = {}
        others: list = []
        stall = Stall(self.timeout, f"{len(requests)} request(s)")
        try:
            for position, request in enumerate(requests):
                external[position] = f"lora-doctor-{next(_REQUEST_IDS)}"
                internal = core.add_request(external[position], request, params, lora_request=lora_request)
                # Outputs carry the id the caller gave; vLLM adds a random suffix inside the engine.
                order[external[position]] = order[internal] = position
            while len(finished) < len(requests):
                with engine_call("a step of the engine"):
                    outputs = core.step()
                for output in outputs:
                    position = order.get(output.request_id)
                    if position is None:
                        if output.finished:
                            others.append(output)
                    elif output.finished:
                        finished[position] = output
                stall.observe((len(finished), _tokens_so_far(core, order)))
        except BaseException:
            _abort(core, [name for position, name in external.items() if position not in finished])
            raise
        finally:
            _hand_back(core, others)
        return [finished[position] for position in range(len(requests))]

    def close(self) -> None:
        """Shut an engine lora-doctor built down (an attached one keeps running); leave the process as found."""
        engine = getattr(self, "llm", None)
        try:
            if engine is not None and self._owned and _LEFT_TO_PROCESS_EXIT is not None and not _has_child_processes():
                _LEFT_TO_PROCESS_EXIT.append(self.llm)  # referenced: no finalizer shuts it down before the exit
                del self.llm
                if not self._shared_parallel_state:
                    # Its process groups go all the same: their rendezvous file (vllm_dist_* in the
                    # temporary folder) is removed with the last of them, and by nothing at exit.
                    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                    destroy_model_parallel()
                    destroy_distributed_environment()
            elif engine is not None and self._owned:
                shutdown = getattr(self.core, "engine_core", None)
                del self.llm
                if shutdown is not None and hasattr(shutdown, "shutdown"):
                    with keeping_parallel_state() if self._shared_parallel_state else nullcontext():
                        shutdown.shutdown()
        finally:
            self._restore_process()
            if self._files is not None:
                self._files.cleanup()


@contextmanager
def engine_operation(what: str, timed: bool = True) -> Iterator[None]:
    """An operation of the running engine: its failure is the environment's (exit 3), never a crash of
    lora-doctor (exit 4) nor the user's input (exit 2); out of memory is named as such. `timed`: one
    call the command's watchdog times (engine/deadline.py)."""
    try:
        with engine_call(what) if timed else nullcontext():
            yield
    except LoraDoctorError:
        raise
    except Exception as error:
        raise engine_problem(what, error) from None


def _tokens_so_far(core, order: dict[str, int]) -> int:
    """Tokens the engine has produced so far for lora-doctor's unfinished requests (its progress):
    generated, and, with the scheduler in this process, prompt tokens computed (a long prompt's
    prefill chunks produce no token)."""
    states = getattr(getattr(core, "output_processor", None), "request_states", {})
    scheduler = getattr(getattr(getattr(core, "engine_core", None), "engine_core", None), "scheduler", None)
    scheduled = getattr(scheduler, "requests", {})
    total = 0
    for name in order:
        state = states.get(name)
        if state is not None:
            total += state.detokenizer.num_output_tokens() + (not state.is_prefilling)
        request = scheduled.get(name)
        if request is not None:
            total += request.num_computed_tokens
    return total


def _abort(core, names: list[str]) -> None:
    """Remove lora-doctor's unfinished requests from the engine: none reaches the caller's next step
    (vllm.LLM sorts its outputs by numeric request id: a leftover of lora-doctor's would break it)."""
    if names:
        try:
            core.abort_request(names)
        except Exception:  # an engine too broken to abort: the error that brought us here is the one to tell
            pass


def _hand_back(core, outputs: list) -> None:
    """The caller's own finished outputs that lora-doctor's loop stepped past: its next step returns
    them (and the engine counts as having unfinished requests until then), as if they finished then."""
    if not outputs:
        return
    pending = list(outputs)
    overridden = {name: vars(core)[name] for name in ("step", "has_unfinished_requests") if name in vars(core)}
    step, unfinished = core.step, core.has_unfinished_requests

    def restore() -> None:
        for name in ("step", "has_unfinished_requests"):
            if name in overridden:
                setattr(core, name, overridden[name])
            else:
                delattr(core, name)

    def step_handing_back():
        restore()
        handed, pending[:] = list(pending), []
        return handed + step()

    core.step = step_handing_back
    core.has_unfinished_requests = lambda: bool(pending) or unfinished()


def adapter_refused(error: BaseException) -> bool:
    """Whether vLLM's `add_lora` failed on the adapter itself (exit 2), not as an engine (exit 3).

    vLLM refuses an adapter with a ValueError (its config against the engine's LoRA settings, its
    modules, its tensors' shapes), a client error of its own (`LoRAAdapterNotFoundError`), or the
    error of reading its files (OSError, safetensors' error). Anything else, a dead engine
    (`EngineDeadError`) included, is the engine's failure.
    """
    from vllm.exceptions import VLLMClientError, VLLMServerError

    for cause in _causes(error):
        if isinstance(cause, VLLMServerError):
            return False
        if isinstance(cause, (TimeoutError, ConnectionError)):
            return False  # OSErrors of the engine's own processes and pipes, not of the adapter's files
        if isinstance(cause, (ValueError, OSError, VLLMClientError)) or type(cause).__name__ == "SafetensorError":
            return True
    return False


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and the errors it was raised from (vLLM wraps a file's error in its own)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _dense_logprobs(flat, vocab_size: int) -> torch.Tensor:
    """vLLM's flat log-probs of the generated tokens → a dense `(tokens, vocab)` tensor."""
    positions = len(flat.start_indices)
    dense = torch.full((positions, vocab_size), float("-inf"), dtype=torch.float32)
    if positions == 0:
        return dense
    counts = np.asarray(flat.end_indices) - np.asarray(flat.start_indices)
    rows = torch.from_numpy(np.repeat(np.arange(positions), counts))
    first, last = flat.start_indices[0], flat.end_indices[-1]
    token_ids = torch.from_numpy(np.asarray(flat.token_ids[first:last], dtype=np.int64))
    dense[rows, token_ids] = torch.from_numpy(np.asarray(flat.logprobs[first:last], dtype=np.float32))
    return dense


def _dense_prompt_logprobs(flat, vocab_size: int) -> torch.Tensor:
    """vLLM's flat prompt log-probs (first position empty) → a dense `(len-1, vocab)` tensor."""
    positions = len(flat.start_indices) - 1
    dense = torch.full((positions, vocab_size), float("-inf"), dtype=torch.float32)
    if positions == 0:
        return dense
    # Positions 1.. are stored back to back: one entry range per position.
    first, last = flat.start_indices[1], flat.end_indices[-1]
    counts = np.diff(np.asarray(flat.start_indices[1:] + [last]))
    rows = torch.from_numpy(np.repeat(np.arange(positions), counts))
    token_ids = torch.from_numpy(np.asarray(flat.token_ids[first:last], dtype=np.int64))
    dense[rows, token_ids] = torch.from_numpy(np.asarray(flat.logprobs[first:last], dtype=np.float32))
    return dense


def _captured_tables(captured, prompts: list[list[int]], outputs, vocab_size: int) -> list[torch.Tensor] | None:
    """Split the worker's captured chunks into one table per prompt, or None when they do not line up.

    Chunks come in the order the engine computed them (requests in order, each request's prefill
    chunks in order); each must predict exactly the next tokens of its prompt, and hold at each of
    them the log-prob vLLM itself returned for that token.
    """
    chunks = iter(captured or [])
    tables = []
    for ids, output in zip(prompts, outputs, strict=True):
        pieces, rows = [], 0
        while rows < len(ids) - 1:
            targets, logprobs = next(chunks, (None, None))
            if targets is None or targets.tolist() != ids[rows + 1 : rows + 1 + len(targets)]:
                return None
            pieces.append(logprobs[:, :vocab_size])
            rows += len(targets)
        table = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.empty(0, vocab_size)
        own = [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:], strict=True)]
        if rows != len(ids) - 1 or table[torch.arange(rows), torch.tensor(ids[1:], dtype=torch.long)].tolist() != own:
            return None
        tables.append(table)
    return tables if next(chunks, None) is None else None
