"""The exit code is the contract a training script gates on: 0 pass, 1 a measured problem, 2 bad input,
3 environment, 4 a crash of lora-doctor itself. Every case runs the real CLI: its `main` in this
process, or a process of its own where only that shows it (the engine's own output, a memory limit on
the whole process, one real process per exit code: 2 in test_bad_input.py, 3 and 4 here)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import BASE, CHECKPOINT, ROOT, CliRun, adapter_modules, assert_one_line_error, run_cli, run_cli_process, subprocess_env
from failing_engine_plans import no_memory_left
from processes import run_process
from safetensors.torch import load_file, save_file

from lora_doctor.engine.worker_contract import layer_read, to_wire
from lora_doctor.errors import EnvironmentProblem

pytestmark = pytest.mark.slow  # builds engines of its own or runs a trainer (`make test-quick` leaves it out)

BAD_PLANS = ROOT / "tests" / "bad_plans.py"
# What the engine and its libraries print on their own; none of it may reach a user by default.
CHATTER = ("Loading safetensors checkpoint shards", "NUMA binding", "Triton is installed", "Loading weights", "[rank0]")


def plan_line(function_name: str, text: str) -> int:
    """The line of `text` inside `function_name` in tests/bad_plans.py."""
    lines = BAD_PLANS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {function_name}("))
    return next(i for i in range(start, len(lines)) if text in lines[i]) + 1


def run_cli_script(script: str, exit_code: int, needle: str, unwritten: Path) -> str:
    """Run a script that prepares the process (a broken function, a memory limit), then the CLI's `main`."""
    done = run_process([sys.executable, "-c", script], env=subprocess_env(), timeout=300)
    return assert_one_line_error(CliRun(done.returncode, done.stdout, done.stderr), exit_code, needle, unwritten)


def test_a_custom_plan_that_raises_is_bad_input_at_its_line(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", f"{BAD_PLANS}:raises", "--json", tmp_path / "r.json")
    line = assert_one_line_error(run, 2, "RuntimeError: boom", unwritten=tmp_path / "r.json")
    assert f"bad_plans.py:{plan_line('raises', 'raise RuntimeError')}" in line


def test_a_custom_plan_that_misuses_the_sync_handle_is_bad_input_at_its_line(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", f"{BAD_PLANS}:misuses_the_api", "--json", tmp_path / "r.json")
    line = assert_one_line_error(run, 2, "TypeError", unwritten=tmp_path / "r.json")
    assert f"bad_plans.py:{plan_line('misuses_the_api', 'load_merged')}" in line


def test_a_custom_plan_with_a_wrong_signature_is_bad_input(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", f"{BAD_PLANS}:two_arguments", "--json", tmp_path / "r.json")
    assert_one_line_error(run, 2, "must take one argument", unwritten=tmp_path / "r.json")


def test_a_custom_plan_that_never_probes_measured_nothing(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", f"{BAD_PLANS}:never_probes", "--json", tmp_path / "r.json")
    assert_one_line_error(run, 2, "measured nothing", unwritten=tmp_path / "r.json")


def test_a_crash_is_exit_4_with_the_traceback_saved(tmp_path):
    # An internal function failing the way a bug would, in a real CLI process.
    script = (
        "import importlib, sys\n"
        "check = importlib.import_module('lora_doctor.checker')\n"
        "def broken(*args, **kwargs):\n"
        "    raise ZeroDivisionError('division by zero')\n"
        "check.inspect_checkpoint = broken\n"
        "from lora_doctor.cli import main\n"
        f"sys.argv = ['lora-doctor', 'check', {str(CHECKPOINT)!r}, '--json', {str(tmp_path / 'r.json')!r}]\n"
        "main()\n"
    )
    line = run_cli_script(script, 4, "internal error: ZeroDivisionError", unwritten=tmp_path / "r.json")
    saved = Path(re.search(r"traceback is in (\S+)", line).group(1))
    assert "Traceback (most recent call last)" in saved.read_text()
    assert "ZeroDivisionError" in saved.read_text()
    # The engine's log, kept for the bug report, is named in it.
    log = Path(re.search(r"engine log: (\S+)", saved.read_text()).group(1))
    assert log.is_file()
    saved.unlink()
    log.unlink()


def test_kv_cache_of_zero_is_bad_input(tmp_path):
    run = run_cli("check", CHECKPOINT, "--kv-cache-gib", "0", "--json", tmp_path / "r.json")
    assert_one_line_error(run, 2, "--kv-cache-gib must be at least 1", unwritten=tmp_path / "r.json")


def test_kv_cache_option_wins_over_the_environment_and_verbose_shows_the_engine(tmp_path):
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    run = run_cli_process("check", CHECKPOINT, "--plan", "merged", "--kv-cache-gib", "2", "--verbose", "--json", tmp_path / "r.json", env=env)
    assert run.exit_code == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["environment"]["kv_cache_gib"] == 2
    # --verbose: the engine's own output is shown rather than kept in a log.
    assert "Loading safetensors checkpoint shards" in run.stderr


def test_the_environment_sizes_the_kv_cache_without_the_option_and_the_engine_stays_quiet(default_check):
    # The demo's command in a process of its own, VLLM_CPU_KVCACHE_SPACE=3 and no --kv-cache-gib.
    run = default_check.run
    assert run.exit_code == 1, run.stderr
    assert default_check.report["environment"]["kv_cache_gib"] == 3
    assert run.stderr.strip() == "", run.stderr
    assert not any(noise in run.stdout for noise in CHATTER), run.stdout


@pytest.fixture
def nan_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint-nan"
    shutil.copytree(CHECKPOINT, path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    return path


def test_a_nan_adapter_stops_the_check_before_anything_loads(tmp_path, nan_checkpoint):
    out = tmp_path / "report"
    run = run_cli("check", nan_checkpoint, "--base", BASE, "--json", tmp_path / "r.json", "--report", out)
    assert run.exit_code == 1, run.stderr
    assert "nan_inf" in run.stdout and "check stopped" in run.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["phases"] == [] and report["verdict"] == "fail" and report["exit_code"] == 1
    assert "nan_inf" in report["stopped"]
    assert [f["code"] for f in report["preflight"] if f["severity"] == "problem"] == ["nan_inf"]
    # Nothing was loaded: a stopped report has no stage timings at all, so they cannot show it; the
    # check's own progress does (a Checker says "loading the reference" and "starting the vLLM engine"
    # before it loads either).
    assert report["seconds"] == {}
    from lora_doctor import check

    said: list[str] = []
    assert check(nan_checkpoint, base=BASE, progress=said.append).stopped == report["stopped"]
    assert not [message for message in said if "reference" in message or "engine" in message], said
    assert "stopped before measuring" in (out / "report.md").read_text()
    assert "stopped before measuring" in (out / "report.html").read_text()
    rerendered = run_cli("report", out / "report.json", "--format", "terminal")
    assert rerendered.exit_code == 1 and "check stopped" in rerendered.stdout


def test_a_tensor_parallel_size_the_model_cannot_split_is_bad_input(tmp_path):
    # The fixture has 2 attention heads: 3 ranks cannot share them.
    run = run_cli("check", CHECKPOINT, "-tp", "3", "--json", tmp_path / "r.json")
    assert_one_line_error(run, 2, "does not divide the model's 2 attention heads", unwritten=tmp_path / "r.json")


@pytest.fixture
def large_base(tmp_path: Path) -> Path:
    """A real Qwen2 model whose bf16 weights (a 1M-token embedding, ~256 MB) double in float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config.from_pretrained(BASE)
    config.vocab_size = 1_000_000
    torch.manual_seed(0)
    path = tmp_path / "large-base"
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE / name, path / name)
    return path


def test_a_reference_that_runs_out_of_memory_is_an_environment_problem(tmp_path, large_base):
    # The process may map the base once (the pre-flight reads it) but not hold it in float32 as well:
    # the address-space limit leaves room for the file plus 400 MB, the float32 reference needs twice the file.
    weights = large_base / "model.safetensors"
    margin = weights.stat().st_size + (400 << 20)
    script = (
        "import resource, sys\n"
        "import torch, transformers, peft, lora_doctor.measure.reference, lora_doctor.cli\n"
        "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (size + {margin}, resource.RLIM_INFINITY))\n"
        f"sys.argv = ['lora-doctor', 'check', {str(CHECKPOINT)!r}, '--base', {str(large_base)!r}, '--dtype', 'float32', '--json', {str(tmp_path / 'r.json')!r}]\n"
        "lora_doctor.cli.main()\n"
    )
    line = run_cli_script(script, 3, "not enough memory to load the reference model", unwritten=tmp_path / "r.json")
    engine_log_of(line)


def worker_of(checker):
    """The in-process engine's worker (lora-doctor's extension mixed in) and its model."""
    worker = checker.engine.llm.llm_engine.model_executor.driver_worker.worker
    return worker, worker.model_runner.get_model()


def test_the_per_module_read_refuses_fully_sharded_lora_with_the_logits_only_hint(checker):
    worker, _model = worker_of(checker)
    config = worker.model_runner.lora_config
    config.fully_sharded_loras = True
    try:
        with pytest.raises(EnvironmentProblem, match="fully sharded.*--no-module-read"):
            worker.lora_doctor_layer_stats(to_wire(layer_read(checker.checkpoint)), None)
    finally:
        config.fully_sharded_loras = False


def test_the_per_module_read_refuses_a_packed_layer_that_disagrees_with_its_mapping(checker):
    from lora_doctor.engine.worker import _shards

    _worker, model = worker_of(checker)
    name = "model.layers.0.self_attn.qkv_proj"
    layer = model.lora_manager.modules[name]
    with pytest.raises(EnvironmentProblem, match="3 LoRA slices but packed mapping.*--no-module-read"):
        _shards(name, layer, {"qkv_proj": ["q_proj", "k_proj"]})


def test_the_per_module_read_refuses_a_layer_class_it_does_not_know(checker):
    from lora_doctor.engine.worker import _packed_mapping, _shards

    _worker, model = worker_of(checker)
    name = "model.layers.0.self_attn.qkv_proj"
    unwrapped = model.lora_manager.modules[name].base_layer  # a vLLM linear layer without LoRA
    with pytest.raises(EnvironmentProblem, match="does not know QKVParallelLinear.*--no-module-read"):
        _shards(name, unwrapped, _packed_mapping(model))


def test_the_gate_refuses_a_stopped_check_and_says_why(nan_checkpoint):
    from lora_doctor import ProblemDetected, gate

    with pytest.raises(ProblemDetected, match="pre-flight found problems.*nan_inf") as refused:
        gate(nan_checkpoint, base=BASE)
    assert refused.value.exit_code == 1 and refused.value.report.phases == []


# After start-up: out of memory and engine failures are the environment's (exit 3), wherever they
# happen — in a custom plan's sync, in a built-in plan, in the audit — never bad input (2) or a crash (4).
FAILING_ENGINE_PLANS = ROOT / "tests" / "failing_engine_plans.py"


def engine_log_of(line: str) -> Path:
    """The engine log a one-line environment error points to; it must exist (and is removed here)."""
    log = Path(re.search(r"\(engine log: (\S+)\)", line).group(1))
    assert log.is_file()
    log.unlink()
    return log


def test_out_of_memory_while_the_engine_loads_a_custom_plans_adapter_is_an_environment_problem(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", f"{FAILING_ENGINE_PLANS}:out_of_memory_adding_the_adapter", "--json", tmp_path / "r.json")
    line = assert_one_line_error(run, 3, "not enough memory to load the adapter", unwritten=tmp_path / "r.json")
    engine_log_of(line)


def test_out_of_memory_while_a_custom_plan_merges_is_an_environment_problem(tmp_path):
    run = run_cli("check", CHECKPOINT, "--plan", f"{FAILING_ENGINE_PLANS}:out_of_memory_merging", "--json", tmp_path / "r.json")
    line = assert_one_line_error(run, 3, "not enough memory", unwritten=tmp_path / "r.json")
    engine_log_of(line)


def test_an_engine_failure_mid_check_is_an_environment_problem_with_the_engine_log(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    run = run_cli_process(
        "check", CHECKPOINT, "--base", base, "--plan", f"{FAILING_ENGINE_PLANS}:base_removed_before_the_engine_reloads_it", "--json", tmp_path / "r.json"
    )
    line = assert_one_line_error(run, 3, "the vLLM engine failed to reload its weights from disk", unwritten=tmp_path / "r.json")
    engine_log_of(line)


def arrange(monkeypatch, wrapped: str, before) -> None:
    """`Sync.<wrapped>` of every plan runs inside `before()` (a context that arranges a real failure)."""
    from lora_doctor.plans.sync import Sync

    original = getattr(Sync, wrapped)

    def arranged(self, *args, **kwargs):
        with before():
            return original(self, *args, **kwargs)

    monkeypatch.setattr(Sync, wrapped, arranged)


def test_out_of_memory_in_a_builtin_plan_is_an_environment_problem(tmp_path, monkeypatch):
    # The first probe of the built-in merged plan runs with no address space left to map. Where the
    # engine's oneDNN kernels are the first to be refused, they say "could not create a primitive",
    # which does not name memory: an engine failure, exit 3 all the same.
    arrange(monkeypatch, "probe", no_memory_left)
    run = run_cli("check", CHECKPOINT, "--plan", "merged", "--json", tmp_path / "r.json")
    line = assert_one_line_error(run, 3, "error: ", unwritten=tmp_path / "r.json")
    assert "not enough memory" in line or "the vLLM engine failed to generate" in line, line
    engine_log_of(line)


def test_out_of_memory_loading_the_adapter_in_a_builtin_plan_is_an_environment_problem(tmp_path, monkeypatch):
    arrange(monkeypatch, "add_adapter", no_memory_left)
    run = run_cli("check", CHECKPOINT, "--plan", "verl-adapter", "--json", tmp_path / "r.json")
    line = assert_one_line_error(run, 3, "not enough memory to load the adapter", unwritten=tmp_path / "r.json")
    engine_log_of(line)


def test_an_engine_failure_in_a_builtin_plan_is_an_environment_problem_with_the_engine_log(tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)

    @contextmanager
    def weights_removed():
        for weights in base.glob("*.safetensors"):
            weights.unlink()
        yield

    arrange(monkeypatch, "reload_from_disk", weights_removed)
    run = run_cli("check", CHECKPOINT, "--base", base, "--plan", "verl-adapter", "--json", tmp_path / "r.json")
    line = assert_one_line_error(run, 3, "the vLLM engine failed to reload its weights from disk", unwritten=tmp_path / "r.json")
    engine_log_of(line)


def test_an_audit_that_runs_out_of_memory_is_an_environment_problem(tmp_path, large_base):
    # The export is the large base itself (a correct "merge" is not needed to run out of memory):
    # after the imports (safetensors' library too: dlopen under the limit fails before the audit
    # does), the address space has room for 24 MiB more: the status spinner's thread (an 8 MiB stack),
    # not one 32 MiB read.
    script = (
        "import resource, sys\n"
        "import torch, safetensors.torch, lora_doctor.export_audit, lora_doctor.cli\n"
        "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (size + {24 << 20}, resource.RLIM_INFINITY))\n"
        f"sys.argv = ['lora-doctor', 'audit', {str(large_base)!r}, '--adapter', {str(CHECKPOINT)!r}, '--base', {str(large_base)!r}, '--json', {str(tmp_path / 'r.json')!r}]\n"
        "lora_doctor.cli.main()\n"
    )
    run_cli_script(script, 3, "not enough memory to audit the export", unwritten=tmp_path / "r.json")


@pytest.fixture(scope="module")
def rank_32_adapter(tmp_path_factory) -> Path:
    """A real PEFT adapter of rank 32 on the fixture's base (the checkpoint's rank is 8), trained a little:
    B drawn at random so that its ΔW is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    path = tmp_path_factory.mktemp("rank32") / "checkpoint-rank32"
    model.save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(BASE)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_a_custom_plans_adapter_above_the_engines_rank_is_named(tmp_path, rank_32_adapter):
    env = {"LORA_DOCTOR_TEST_ADAPTER": str(rank_32_adapter)}
    run = run_cli("check", CHECKPOINT, "--plan", f"{ROOT / 'tests' / 'custom_plans.py'}:adapter_from_the_environment", "--json", tmp_path / "r.json", env=env)
    line = assert_one_line_error(run, 2, "has LoRA rank 32, above the engine's max_lora_rank 8", unwritten=tmp_path / "r.json")
    assert str(rank_32_adapter) in line and "--previous" in line


def test_the_engine_is_sized_for_a_previous_adapter_of_a_higher_rank(tmp_path, rank_32_adapter):
    # The stale-adapter plan loads --previous (rank 32, on q_proj and v_proj only) then the checkpoint
    # (rank 8, every projection) under one id: the engine keeps serving the previous adapter, which
    # holds the previous ΔW on q/v and nothing on the other modules. Refused (exit 2) on an engine
    # sized for rank 8.
    run = run_cli("check", CHECKPOINT, "--previous", rank_32_adapter, "--plan", "adapter-reused-id", "--json", tmp_path / "r.json")
    assert run.exit_code == 1, run.stderr
    (phase,) = json.loads((tmp_path / "r.json").read_text())["phases"]
    assert phase["verdict"] == "partial", phase["explanation"]
    verdicts = {layer["module"]: layer["verdict"] for layer in phase["layers"]}
    assert set(verdicts) == adapter_modules(CHECKPOINT)
    assert {module for module, verdict in verdicts.items() if verdict == "stale"} == {m for m in verdicts if m.endswith(("q_proj", "v_proj"))}
    assert {verdict for module, verdict in verdicts.items() if not module.endswith(("q_proj", "v_proj"))} == {"missing"}
