"""Custom sync plans that make the real engine stop progressing mid-plan (tests/test_engine_timeout.py).

Each adds the adapter, then replaces the engine's `LLMEngine.step` on that one engine and writes the
time it did so (`time.monotonic()`, this process's clock) to LORA_DOCTOR_TEST_STALL_MARK if set.
"""

import os
import time


def _stall_from_now(sync, step) -> None:
    sync.engine.core.step = step
    mark = os.environ.get("LORA_DOCTOR_TEST_STALL_MARK")
    if mark:
        with open(mark, "w") as handle:
            handle.write(repr(time.monotonic()))


def engine_stops_after_adapter(sync):
    """After add_adapter(), every step returns nothing: as for requests the engine dropped."""
    sync.reload_from_disk()
    sync.add_adapter()
    _stall_from_now(sync, lambda: [])
    sync.probe("adapter")


def engine_step_never_returns(sync):
    """After add_adapter(), the engine's next step never returns (a hang inside one step)."""
    sync.reload_from_disk()
    sync.add_adapter()
    _stall_from_now(sync, lambda: time.sleep(3600) or [])
    sync.probe("adapter")
