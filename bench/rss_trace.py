"""Where a check's resident memory peaks: the check in this process, its RSS sampled every 20 ms
and attributed to the progress message showing at the time.

    python bench/rss_trace.py CHECKPOINT [check options...]

e.g. with the 151,936-token model `bench/check_scale.py --keep DIR` builds:

    python bench/rss_trace.py fixtures/checkpoint-500 --base DIR/tiny-qwen2-151936 --prompts DIR/prompts-20.jsonl

Prints, per progress message (the stage of the check), the peak RSS while it showed and the RSS when
it began, highest peak first, then the whole run's peak (VmHWM).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE", "VLLM_LOGGING_LEVEL": "ERROR"}


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1e6
    return float("nan")


def main() -> None:
    for name, value in ENV.items():
        os.environ.setdefault(name, value)
    from lora_doctor import checker

    stages: dict[str, list[float]] = {}  # message → [RSS at start, peak]
    current = ["start-up"]
    stages["start-up"] = [_status("VmRSS:"), 0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            rss = _status("VmRSS:")
            stage = stages[current[0]]
            stage[1] = max(stage[1], rss)

    original = checker.Checker.__init__

    def traced(self, *args, progress=None, **kwargs):
        def say(message: str) -> None:
            stages.setdefault(message, [_status("VmRSS:"), 0.0])
            current[0] = message  # after its entry exists: the sampler reads it
            if progress is not None:
                progress(message)

        original(self, *args, progress=say, **kwargs)

    checker.Checker.__init__ = traced
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    from lora_doctor import cli

    sys.argv = ["lora-doctor", "check", *sys.argv[1:], "-q"]
    started = time.perf_counter()
    try:
        cli.main()
    except SystemExit as end:
        code = end.code
    else:
        code = 0
    done.set()
    thread.join()
    print(f"exit {code}, {time.perf_counter() - started:.1f} s, peak RSS (VmHWM) {_status('VmHWM:'):.2f} GB")
    for message, (start, peak) in sorted(stages.items(), key=lambda item: -item[1][1])[:12]:
        print(f"  peak {peak:5.2f} GB  (from {start:5.2f})  {message}")


if __name__ == "__main__":
    main()
