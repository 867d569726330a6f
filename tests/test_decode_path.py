"""What the rollouts see: the decode path through the engine's prefix cache, on the real engine.

Each row of issue 18's table: an adapter reloaded in place under the same name and folder, and a
merged push without `reset_prefix_cache()`, read stale KV blocks with prefix caching on (vLLM's
default) and agree with a fresh load after a reset or with caching off.
"""

from __future__ import annotations

import pytest
from conftest import CHECKPOINT, PREVIOUS, adapter_modules, assert_one_line_error, layer_modules, run_cli

from lora_doctor.checker import engine_summary
from lora_doctor.plans.builtin import Plan

# The logit noise of a healthy float32 phase is ~1e-8 of KL and ~1e-4 of log-prob; a stale block
# (another adapter state's keys and values) moves the generated tokens' log-probs by 1e-2 or more
# (issue 18's table: 0.003–0.06 on the first two tokens). Between the two lies a decade each way.
FRESH_LOGPROB_DIFF = 1e-3
STALE_LOGPROB_DIFF = 1e-2


def inplace_then_reset(sync):
    """The in-place reload of vLLM #42125, followed by the reset a trainer should call."""
    sync.reload_from_disk()
    sync.reset_cache()
    sync.add_adapter(id=1, weights="previous")
    sync.rollout()
    sync.add_adapter(id=1, load_inplace=True, weights="current")
    sync.reset_cache()
    sync.probe("adapter-inplace-reset")


def merged_then_reset(sync):
    """Rollouts, a merged push, then reset_prefix_cache(): what TRL's sync_weights does."""
    sync.reload_from_disk()
    sync.reset_cache()
    sync.rollout()
    sync.load_merged()
    sync.reset_cache()
    sync.probe("full-merged-reset")


def same_id_keeps_its_folder(sync):
    """The folder an id is given is the one it keeps when re-added."""
    sync.reload_from_disk()
    sync.add_adapter(id=5, weights="previous")
    first = sync.lora_request
    sync.add_adapter(id=5, weights="current", load_inplace=True)
    second = sync.lora_request
    assert (first.lora_name, first.lora_path) == (second.lora_name, second.lora_path)
    sync.reset_cache()
    sync.probe("same-id")


def plan(function) -> Plan:
    return Plan(function.__name__, function.__doc__, function)


@pytest.fixture(scope="module")
def cached():
    """An engine as the trainer's: vLLM's defaults, so prefix caching on; the built-in prompts."""
    from lora_doctor import Checker

    # lora-doctor sets what its engine needs while it builds it, and leaves os.environ as it was.
    with Checker(CHECKPOINT, previous=PREVIOUS) as checker:
        yield checker


@pytest.fixture(scope="module")
def uncached(cached):
    """The same engine with the trainer's `enable_prefix_caching=False`."""
    from lora_doctor import Checker

    with Checker(CHECKPOINT, previous=PREVIOUS, engine_options={"enable_prefix_caching": False}) as checker:
        yield checker


def explain(report):
    return [(p.name, p.verdict, p.explanation, p.decode_kl_mean, p.decode_kl_no_cache) for p in report.phases]


def test_the_engine_runs_with_prefix_caching_on_and_the_prompts_reach_it(cached):
    report = cached.run("swift-fixed")
    assert report.engine["options"]["enable_prefix_caching"] is True
    assert report.engine["given"] == {}
    assert report.engine["cache_exercised"] and report.engine["cache_blocks"] >= 2
    assert report.verdict == "pass", explain(report)
    assert [phase.name for phase in report.phases] == ["full-base", "adapter"]
    for phase in report.phases:
        assert phase.decode_positions > 0
        assert phase.decode_kl_mean <= phase.kl_limit
        assert phase.decode_logprob_diff_max < FRESH_LOGPROB_DIFF
        assert phase.base_route_kl is not None and phase.base_route_kl <= phase.kl_limit


def test_inplace_reload_under_the_same_name_and_folder_reads_stale_blocks(cached):
    (phase,) = cached.run("vllm-inplace-same-path").phases
    assert phase.verdict == "stale_cache", phase.explanation
    # The weights and the prompt path are right: only the rollouts read the previous adapter's KV.
    assert phase.kl_mean <= phase.kl_limit
    assert layer_modules(phase.layers) == adapter_modules(CHECKPOINT)
    assert all(layer.verdict == "ok" for layer in phase.layers)
    assert phase.decode_kl_mean > phase.kl_limit
    assert phase.decode_logprob_diff_max > STALE_LOGPROB_DIFF
    assert phase.decode_kl_no_cache is not None and phase.decode_kl_no_cache <= phase.kl_limit


def test_inplace_reload_then_reset_is_fresh(cached):
    (phase,) = cached.run(plan(inplace_then_reset)).phases
    assert phase.verdict == "ok", phase.explanation
    assert phase.decode_logprob_diff_max < FRESH_LOGPROB_DIFF


def test_merged_push_without_reset_reads_stale_blocks(cached):
    (phase,) = cached.run("merged-no-cache-reset").phases
    assert phase.verdict == "stale_cache", phase.explanation
    # Judged: the logits resolve the LoRA in float32 and the prompts' requests read cached blocks.
    assert phase.decode_cache_blocks >= 2 and phase.not_measured == {}
    assert phase.kl_mean <= phase.kl_limit
    assert phase.decode_logprob_diff_max > STALE_LOGPROB_DIFF
    assert phase.decode_kl_no_cache <= phase.kl_limit


def test_merged_push_then_reset_is_fresh(cached):
    (phase,) = cached.run(plan(merged_then_reset)).phases
    assert phase.verdict == "ok", phase.explanation
    assert phase.decode_logprob_diff_max < FRESH_LOGPROB_DIFF


@pytest.mark.parametrize("name", ["vllm-inplace-same-path", "merged-no-cache-reset"])
def test_with_prefix_caching_off_the_same_syncs_are_fresh(uncached, name):
    report = uncached.run(name)
    assert report.engine["options"]["enable_prefix_caching"] is False
    assert report.engine["given"] == {"enable_prefix_caching": False}
    assert not report.engine["cache_exercised"]
    (phase,) = report.phases
    assert phase.verdict == "ok", phase.explanation
    assert phase.decode_logprob_diff_max < FRESH_LOGPROB_DIFF


def test_an_id_re_added_keeps_its_name_and_folder(cached):
    (phase,) = cached.run(plan(same_id_keeps_its_folder)).phases
    assert phase.verdict == "ok", phase.explanation


def test_rollouts_requested_without_the_loaded_adapter_are_named(cached):
    (phase,) = cached.run("rollout-without-adapter").phases
    assert phase.verdict == "adapter_not_requested", phase.explanation
    assert not phase.with_adapter


def test_a_plan_that_drops_an_adapter_it_never_loaded_is_missing(cached):
    (_merged, woken) = cached.run("trl-sleep-reload").phases
    assert woken.verdict == "missing"


def test_short_prompts_do_not_exercise_the_cache(cached):
    summary = engine_summary(cached.engine, {}, [[1] * 20, [2] * 128])
    assert summary["cache_blocks"] == 0 and not summary["cache_exercised"]
    assert engine_summary(cached.engine, {}, [[1] * 129])["cache_blocks"] == 1


@pytest.mark.parametrize(
    ("option", "needle"),
    [("no_such_option=1", "not an option of vLLM's engine"), ("enable_lora=false", "sets enable_lora itself"), ("prefix", "expected KEY=VALUE")],
)
def test_a_bad_engine_option_is_bad_input(tmp_path, option, needle):
    out = tmp_path / "r.json"
    run = run_cli("check", CHECKPOINT, "--engine-option", option, "--json", out)
    assert_one_line_error(run, 2, needle, unwritten=out)


def test_every_renderer_shows_the_decode_path_and_the_engine_options(cached):
    import io
    import json

    from rich.console import Console

    from lora_doctor.report import render_html, render_json, render_markdown, render_terminal
    from lora_doctor.result import Report

    report = cached.run("vllm-inplace-same-path")
    (phase,) = report.phases
    decode_kl = f"{phase.decode_kl_mean:.2e}"
    no_cache = f"{phase.decode_kl_no_cache:.2e}"
    console = Console(file=io.StringIO(), width=250)
    render_terminal(report, console)
    views = {"terminal": console.file.getvalue(), "markdown": render_markdown(report), "html": render_html(report)}
    for name, text in views.items():
        assert "decode" in text.lower() and decode_kl in text and no_cache in text, name
        assert "enable_prefix_caching" in text and "exercised" in text, name
        assert "stale_cache" in text, name
    data = json.loads(render_json(report))
    assert data["schema_version"] == 1
    assert data["phases"][0]["decode_kl_no_cache"] == pytest.approx(phase.decode_kl_no_cache)
    assert data["engine"]["options"]["enable_prefix_caching"] is True
    # A saved report reads back with the decode figures and the engine's options.
    assert Report.from_dict(data).engine == report.engine


def test_the_cli_takes_the_trainers_engine_options_and_reports_them(tmp_path):
    out = tmp_path / "r.json"
    run = run_cli(
        "check", CHECKPOINT, "--previous", PREVIOUS, "--plan", "vllm-inplace-same-path",
        "--engine-option", "enable_prefix_caching=false", "--engine-option", "max_num_seqs=8", "--json", out,
    )
    assert run.exit_code == 0, run.stderr[-3000:]  # without the cache, the in-place reload is fresh
    engine = run.report(out)["engine"]
    assert engine["given"] == {"enable_prefix_caching": False, "max_num_seqs": 8}
    assert engine["options"]["enable_prefix_caching"] is False and engine["options"]["max_num_seqs"] == 8
    assert "enable_prefix_caching=no (given)" in run.stdout
