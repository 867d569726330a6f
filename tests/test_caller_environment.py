"""A library leaves its caller's process alone: importing lora-doctor sets no environment variable (the
`lora-doctor` command sets OpenMP's passive waiting for its own process), and a RouteRecorder gives
the object it wrapped its method back."""

from __future__ import annotations

import json
import os
import sys

from conftest import ROOT
from processes import run_process

from lora_doctor.live import RouteRecorder

IMPORTS = """
import json, os, sys
before = dict(os.environ)
import lora_doctor
after_import = dict(os.environ)
torch_loaded = "torch" in sys.modules
from lora_doctor import check, gate, probe, Report  # the API, loaded on first use
print(json.dumps({
    "changed_by_import": sorted(k for k in {*before, *after_import} if before.get(k) != after_import.get(k)),
    "torch_loaded_by_import": torch_loaded,
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    "api": [check.__module__, gate.__module__, probe.__module__, Report.__module__],
}))
"""

def without_omp() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_importing_lora_doctor_changes_no_environment_variable():
    done = run_process([sys.executable, "-c", IMPORTS], env=without_omp(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["changed_by_import"] == [] and seen["torch_loaded_by_import"] is False
    assert seen["omp_wait_policy"] is None  # the API loaded: still the caller's (unset)
    assert seen["api"] == ["lora_doctor.checker", "lora_doctor.live", "lora_doctor.live", "lora_doctor.result"]


def test_the_command_sets_passive_waiting_before_torch_loads():
    # The command's own process: OMP_WAIT_POLICY is PASSIVE by the time torch is imported.
    script = (
        "import os, sys\n"
        "sys.argv = ['lora-doctor', 'plans']\n"
        "import builtins\n"
        "real_import = builtins.__import__\n"
        "seen = []\n"
        "def watching(name, *args, **kwargs):\n"
        "    if name == 'torch' and 'torch' not in sys.modules and not seen:\n"
        "        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "        sys.stderr.write(f'policy at torch import: {seen[0]}\\n')\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = watching\n"
        "from lora_doctor.cli import run\n"
        "run()\n"
    )
    done = run_process([sys.executable, "-c", script], env=without_omp(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "policy at torch import: PASSIVE" in done.stderr, done.stderr[-3000:]


class Engine:
    def generate(self, prompts, lora_request=None):
        return [f"generated {prompt}" for prompt in prompts]


def test_a_route_recorder_gives_the_method_back_when_closed():
    engine = Engine()
    with RouteRecorder(engine, "generate") as recorder:
        assert engine.generate(["a"], lora_request="adapter-1") == ["generated a"]
        assert "generate" in vars(engine)  # wrapped on this object only
    assert recorder.seen and recorder.lora_request == "adapter-1"
    assert "generate" not in vars(engine) and engine.generate.__func__ is Engine.generate
    engine.generate(["b"], lora_request=None)
    assert recorder.lora_request == "adapter-1"  # no longer recording


def test_a_route_recorder_restores_an_attribute_the_object_had_itself():
    engine = Engine()
    own = engine.generate  # e.g. a trainer that already wrapped its engine's method
    engine.generate = own
    recorder = RouteRecorder(engine, "generate")
    recorder.close()
    recorder.close()  # a second close changes nothing
    assert vars(engine)["generate"] is own
