"""The options' defaults have one home (`lora_doctor/defaults.py`): the command's and the library's are the same.

Read from the signatures and from the command's own parameters (typer's click command), not restated:
a default changed in one place and not the other fails here.
"""

from __future__ import annotations

import inspect

import typer

from lora_doctor import callback, checker, cli, defaults, live
from lora_doctor.integrations import trl_grpo
from lora_doctor.plans.builtin import PLANS

# `check`'s command options → (the library's keyword, the default in lora_doctor.defaults).
CHECK_OPTIONS = {
    "plan": ("plan", defaults.PLAN),
    "prompts": ("prompts", defaults.PROMPTS),
    "max_new_tokens": ("max_new_tokens", defaults.MAX_NEW_TOKENS),
    "dtype": ("dtype", defaults.DTYPE),
    "tensor_parallel_size": ("tensor_parallel_size", defaults.TENSOR_PARALLEL_SIZE),
    "kv_cache_gib": ("kv_cache_gib", defaults.KV_CACHE_GIB),
    "reference_device": ("reference_device", defaults.REFERENCE_DEVICE),
    "engine_timeout": ("engine_timeout", defaults.ENGINE_TIMEOUT),
}


def command_defaults(name: str) -> dict:
    command = typer.main.get_command(cli.app).commands[name]
    return {param.name: param.default for param in command.params}


def signature_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not inspect.Parameter.empty}


def test_the_check_command_and_the_library_share_every_default():
    command = command_defaults("check")
    library = {**signature_defaults(checker.Checker.__init__), **signature_defaults(checker.check)}
    validated = signature_defaults(checker.validate_options)
    for option, (keyword, default) in CHECK_OPTIONS.items():
        assert command[option] == default, option
        assert library[keyword] == default, keyword
        if keyword in validated:
            assert validated[keyword] == default, keyword
    # The command's switch is the library's flag turned around.
    assert command["no_module_read"] is (not defaults.MODULE_READ)
    assert library["module_read"] is defaults.MODULE_READ
    assert signature_defaults(live.gate)["plan"] == defaults.PLAN


def test_probe_and_the_callback_share_theirs():
    probe, callback_init = signature_defaults(live.probe), signature_defaults(callback.LoraDoctorCallback.__init__)
    for keyword, default in (
        ("max_new_tokens", defaults.PROBE_MAX_NEW_TOKENS),
        ("module_read", defaults.MODULE_READ),
        ("engine_timeout", defaults.ENGINE_TIMEOUT),
        ("prompts", defaults.PROMPTS),
    ):
        assert probe[keyword] == default == callback_init[keyword], keyword
    assert callback_init["every_n_steps"] == defaults.EVERY_N_STEPS
    assert callback_init["stop_on_failure"] is defaults.STOP_ON_FAILURE
    assert signature_defaults(trl_grpo.add_probe)["engine_timeout"] == defaults.ENGINE_TIMEOUT


def test_the_defaults_are_usable():
    assert defaults.PLAN in PLANS
    assert defaults.MAX_NEW_TOKENS >= 1 and defaults.PROBE_MAX_NEW_TOKENS >= 1 and defaults.TENSOR_PARALLEL_SIZE >= 1
    checker.validate_options()  # the defaults pass the options' own checks
    assert 0 < defaults.ENGINE_TIMEOUT < float("inf")


def test_the_plans_command_marks_the_default():
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["plans"])
    assert result.exit_code == 0
    assert f"{defaults.PLAN} (default)" in result.output
