"""A check, a gate or a probe gives the caller's random generators back as it found them: vLLM's engine
start reseeds Python's, numpy's and torch's generators with 0 in the caller's process."""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy
import pytest
import torch
from conftest import CHECKPOINT, ROOT, subprocess_env
from processes import run_process

from lora_doctor.random_state import preserved_random_state

MARK = "draws: "

# A seeded training script: seed, (gate), then draw from every generator a trainer uses.
SCRIPT = """
import json, random, sys
import numpy, torch
import lora_doctor
random.seed(123); numpy.random.seed(123); torch.manual_seed(123)
if sys.argv[1] == "gate":
    lora_doctor.gate({checkpoint!r}, plan="swift-fixed")
print({mark!r} + json.dumps({{
    "random": [random.random() for _ in range(3)],
    "numpy": numpy.random.rand(3).tolist(),
    "torch": torch.rand(3).tolist(),
}}), flush=True)
"""


@pytest.fixture
def script_tmp() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="seeded-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def draws(with_gate: bool, tmp: Path) -> dict:
    script = SCRIPT.format(checkpoint=str(CHECKPOINT), mark=MARK)
    done = run_process([sys.executable, "-c", script, "gate" if with_gate else "none"], env=subprocess_env({"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARK)).removeprefix(MARK))


@pytest.mark.slow  # starts an engine in a process of its own
def test_a_seeded_script_draws_the_same_numbers_after_a_gate(script_tmp):
    without = draws(False, script_tmp)
    after_gate = draws(True, script_tmp)
    # Not the numbers seed 0 gives (what vLLM's engine start left behind before the states were restored).
    random.seed(0)
    assert after_gate["random"] != [random.random() for _ in range(3)]
    assert after_gate == without


def test_the_states_come_back_after_a_reseed_inside_the_block():
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), numpy.random.rand(), torch.rand(1).item())
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    with preserved_random_state():
        random.seed(0), numpy.random.seed(0), torch.manual_seed(0)  # what vLLM's set_random_seed(0) does
        random.random(), numpy.random.rand(), torch.rand(1)
    assert (random.random(), numpy.random.rand(), torch.rand(1).item()) == expected


def test_the_states_come_back_when_the_block_raises():
    random.seed(7)
    expected = random.random()
    random.seed(7)
    with pytest.raises(RuntimeError), preserved_random_state():
        random.seed(0)
        raise RuntimeError("the check failed")
    assert random.random() == expected
