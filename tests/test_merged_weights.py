"""A full sync's weights streamed one base weight at a time (`MergedWeights`, `StreamedWeights`): the same
values as the whole model materialized, with at most one weight's tensors alive, and small to pickle.

Real safetensors files (the bundled bases and adapters), real tensors; no engine.
"""

from __future__ import annotations

import pickle
import re
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_doctor.adapter.inventory import read_base
from lora_doctor.adapter.lora_delta import MergedWeights, load_merge_factors, merge_in_dtype
from lora_doctor.adapter.weight_files import StreamedWeights, read_tensor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PAIRS = [("tiny-qwen2", "checkpoint-500"), ("tiny-llama", "checkpoint-llama-rslora")]


def materialized(base_dir: Path, adapter_dir: Path, dtype, scale=1.0, layers=None, cycles=0, copies=None) -> dict[str, torch.Tensor]:
    """The merged sync as it was before streaming: every W0 through safetensors' own reader, a dense ΔW
    per module, the whole model gathered in a dict."""
    base = read_base(base_dir)
    deltas = {key: lora.delta() for key, lora in load_merge_factors(adapter_dir, base).items()}
    out = {}
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as handle:
        for name in sorted(handle.keys()):
            held = (copies or {}).get(name, handle.get_tensor(name)).to(dtype)
            match = re.search(r"\.layers\.(\d+)\.", name)
            if name in deltas and (layers is None or (match and int(match.group(1)) in layers)):
                step = scale * deltas[name]
                for _ in range(cycles):
                    held = (held + step.to(dtype)) - step.to(dtype)
                held = merge_in_dtype(held, step, dtype)
            out[name] = held.float()
    return out


def streamed(base_dir: Path, adapter_dir: Path, dtype, scale=1.0, layers=None, cycles=0, copies=None) -> MergedWeights:
    base = read_base(base_dir)
    return MergedWeights(base.tensors, load_merge_factors(adapter_dir, base), dtype, scale, layers, cycles, copies)


@pytest.mark.parametrize("base_name,adapter_name", PAIRS)
@pytest.mark.parametrize(
    "dtype,scale,layers,cycles",
    [(torch.float32, 1.0, None, 0), (torch.bfloat16, 1.0, None, 0), (torch.bfloat16, 0.5, {0}, 3), (torch.float16, 2.0, {1}, 1)],
)
def test_streamed_merge_equals_the_materialized_one_exactly(base_name, adapter_name, dtype, scale, layers, cycles):
    base_dir, adapter_dir = FIXTURES / base_name, FIXTURES / adapter_name
    expected = materialized(base_dir, adapter_dir, dtype, scale, layers, cycles)
    got = list(streamed(base_dir, adapter_dir, dtype, scale, layers, cycles))
    assert [name for name, _ in got] == list(expected)
    changed = 0
    for name, value in got:
        assert value.dtype == torch.float32 and value.shape == expected[name].shape
        assert torch.equal(value, expected[name]), name
        changed += not torch.equal(value, read_tensor(read_base(base_dir).tensors[name]).to(dtype).float())
    # The merge did something (so equality is not that of two unmerged copies).
    assert changed >= 2


def test_a_trained_copy_replaces_the_base_weight():
    base_dir, adapter_dir = FIXTURES / "tiny-qwen2", FIXTURES / "checkpoint-500"
    key = "model.embed_tokens.weight"
    copy = torch.randn(read_base(base_dir).tensors[key].shape, generator=torch.Generator().manual_seed(0))
    got = dict(streamed(base_dir, adapter_dir, torch.float32, copies={key: copy}))
    assert torch.equal(got[key], materialized(base_dir, adapter_dir, torch.float32, copies={key: copy})[key])
    assert torch.equal(got[key], copy)


def test_streamed_base_equals_safetensors_reader():
    base_dir = FIXTURES / "tiny-qwen2"
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as handle:
        expected = {name: handle.get_tensor(name) for name in sorted(handle.keys())}
    got = list(StreamedWeights(read_base(base_dir).tensors))
    assert [name for name, _ in got] == list(expected)
    for name, value in got:
        assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name
        # Memory of its own, not a view of a mapping or of a buffer shared with other tensors.
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


@pytest.mark.parametrize("kind", ["merged", "base"])
def test_at_most_one_weight_alive_while_iterating(kind):
    """A consumer that drops each weight before taking the next (vLLM's reload, one layer at a
    time) holds at most the current one: the iterable itself keeps none of the weights it yielded."""
    base_dir, adapter_dir = FIXTURES / "tiny-qwen2", FIXTURES / "checkpoint-500"
    weights = streamed(base_dir, adapter_dir, torch.bfloat16) if kind == "merged" else StreamedWeights(read_base(base_dir).tensors)
    refs: list[weakref.ref] = []
    most_alive = 0
    for _, value in weights:
        refs.append(weakref.ref(value))
        del value  # no gc.collect(): a weight kept alive by a reference cycle counts as alive
        most_alive = max(most_alive, sum(ref() is not None for ref in refs))
    assert len(refs) == len(read_base(base_dir).tensors) > 10
    assert most_alive == 0
    # The same count on a list (what the push did before) sees every weight alive: the count can fail.
    gathered = list(weights)
    refs = [weakref.ref(value) for _, value in gathered]
    assert sum(ref() is not None for ref in refs) == len(refs)


def test_pickles_small_and_iterates_the_same_after():
    """What crosses to tensor-parallel workers in other processes: where the weights are and the
    LoRA factors, not the weights."""
    base_dir, adapter_dir = FIXTURES / "tiny-qwen2", FIXTURES / "checkpoint-500"
    weights = streamed(base_dir, adapter_dir, torch.bfloat16, scale=0.5)
    data = pickle.dumps(weights)
    model_bytes = sum(value.numel() * value.element_size() for _, value in weights)
    factor_bytes = sum(t.numel() * t.element_size() for lora in weights.factors.values() for t in (lora.A, lora.B))
    assert len(data) < factor_bytes + 100_000 < model_bytes
    again = pickle.loads(data)
    for (name, value), (name2, value2) in zip(weights, again, strict=True):
        assert name == name2 and torch.equal(value, value2)
    base_only = pickle.dumps(StreamedWeights(read_base(base_dir).tensors))
    assert len(base_only) < 100_000


def test_truncated_file_is_bad_input(tmp_path):
    from lora_doctor.errors import BadInput

    source = FIXTURES / "tiny-qwen2" / "model.safetensors"
    tensors = read_base(FIXTURES / "tiny-qwen2").tensors
    last = max(tensors.values(), key=lambda info: info.end)
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(source.read_bytes()[: last.end - 8])
    info = type(last)(last.name, cut, last.dtype, last.shape, last.start, last.end)
    with pytest.raises(BadInput, match="truncated"):
        read_tensor(info)
