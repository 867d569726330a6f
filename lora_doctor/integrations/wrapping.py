"""Methods of a trainer's objects wrapped while lora-doctor watches a run, each given back afterwards."""

from __future__ import annotations

from contextlib import contextmanager


class Wrapped:
    """The methods wrapped so far, in order; `restore` gives each object its own back (an attribute it
    did not have is removed again, so a class's method shows through as before)."""

    def __init__(self):
        self._kept: list[tuple[object, str, bool, object]] = []

    def wrap(self, target, name: str, make) -> None:
        """`target.name = make(target.name)`, remembered for `restore`."""
        had = name in vars(target)
        before = vars(target).get(name)
        setattr(target, name, make(getattr(target, name)))
        self._kept.append((target, name, had, before))

    @contextmanager
    def wrapping(self, target, name: str, make):
        """`wrap` for the duration of the block only."""
        self.wrap(target, name, make)
        kept = self._kept.pop()
        try:
            yield
        finally:
            _give_back(*kept)

    def restore(self) -> None:
        for kept in reversed(self._kept):
            _give_back(*kept)
        self._kept.clear()


def _give_back(target, name: str, had: bool, before) -> None:
    if had:
        setattr(target, name, before)
    else:
        delattr(target, name)


def evented(watch, trainer, kind: str):
    """A `make` for `Wrapped.wrap`: the wrapped call records `kind` at the step it happens in (the
    step its rollouts feed, `global_step + 1`), then runs."""

    def make(original):
        def recorded(*args, **kwargs):
            watch.event(trainer.state.global_step + 1, kind)
            return original(*args, **kwargs)

        return recorded

    return make


class AdapterSwitch:
    """A PEFT policy's LoRA layers switched off for a no-grad forward (the base's log-probs), and back.

    PEFT's `disable_adapter()` first checks every layer's status (`get_model_status`, a walk of the
    model's modules per LoRA layer: 5 ms a step on the 2-layer fixture, growing with the square of the
    layer count) and toggles the adapters' `requires_grad`. Under `no_grad` only the layers' own switch
    matters; a merged layer (never, between the trainers' syncs) goes through PEFT's way. The layers
    are found once, on the first call.
    """

    def __init__(self):
        self._layers = None

    @contextmanager
    def off(self, peft_model):
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [module for module in peft_model.modules() if isinstance(module, BaseTunerLayer)]
        layers = self._layers
        if any(layer.merged for layer in layers) or not all(hasattr(layer, "_disable_adapters") for layer in layers):
            with peft_model.disable_adapter():
                yield
            return
        before = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, was in zip(layers, before):
                layer._disable_adapters = was
