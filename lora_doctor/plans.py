"""Named sync plans: the sequence of syncs a trainer performs, each followed by a probe.

A plan is a function of a `Sync` handle. The built-in plans use the same API a custom plan does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import BadInput
from .sync import Sync


@dataclass(frozen=True)
class Plan:
    name: str
    summary: str
    run: Callable[[Sync], None]


def swift_colocate_lora(sync: Sync) -> None:
    # ms-swift 3.10.0–4.0.1, colocate + vllm_enable_lora, after resume_from_checkpoint (#8233): the
    # first sync sends merged weights as the engine's base and generates from them without an adapter;
    # later syncs add the adapter on top of that merged base.
    sync.load_merged()
    sync.probe("full-merged")
    sync.add_adapter()
    sync.probe("adapter")


def swift_fixed(sync: Sync) -> None:
    # ms-swift >= 4.0.2 (PR #8275): the first full sync sends the unmerged base and adds the adapter at
    # its end; later syncs send the adapter only.
    sync.load_base()
    sync.add_adapter()
    sync.probe("full-base")
    sync.add_adapter()
    sync.probe("adapter")


def merged(sync: Sync) -> None:
    # Merge → push every weight → unmerge at every step (TRL; ms-swift with vllm_enable_lora false);
    # generation never uses an adapter.
    sync.load_merged()
    sync.probe("full-merged")
    sync.load_merged()
    sync.probe("full-merged")


PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan("swift-colocate-lora", "ms-swift 3.10.0–4.0.1 colocate LoRA after resume: merged base, then adapter on top (#8233)", swift_colocate_lora),
        Plan("swift-fixed", "ms-swift >= 4.0.2: unmerged base + adapter, then adapter syncs (PR #8275)", swift_fixed),
        Plan("merged", "merge, push all weights, unmerge at every step (TRL; ms-swift without vllm_enable_lora)", merged),
    )
}
DEFAULT_PLAN = "swift-colocate-lora"


def get_plan(name: str) -> Plan:
    try:
        return PLANS[name]
    except KeyError:
        raise BadInput(f"unknown plan {name!r}; known plans: {', '.join(PLANS)} (see 'lora-doctor plans')") from None
