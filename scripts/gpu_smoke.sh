#!/usr/bin/env bash
# The CUDA paths, on one GPU, with the bundled fixtures only (about 10 minutes):
#   1. the demo in bf16 (the #8233 double count)          expected: exit 1, phase 2 double_counted
#   2. the healthy plan (swift-fixed)                      expected: exit 0
#   3. a merged push without a prefix-cache reset          expected: exit 1, stale_cache
#   4. a probe on a sleeping engine (TRL/ms-swift sleep)   expected: returns at once, unresolved, not_measured.engine
#   5. a probe under vLLM's Model Runner V2                expected: ok, the runner named
# It prints "expected ... got ..." per case and exits 1 if any differs.
#
#   pip install -e '.[gpu]'   # vLLM 0.32.0 for CUDA
#   bash scripts/gpu_smoke.sh
#
# Not run by the test suite (no GPU there): the CPU build runs the suite, this script the CUDA paths.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LORA_DOCTOR=("$PYTHON" -m lora_doctor)
OUT=$(mktemp -d -t lora-doctor-gpu-smoke-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
failures=0

expect() {  # expect NAME EXPECTED GOT
    if [ "$2" = "$3" ]; then echo "ok    $1: expected $2, got $3"; else echo "FAIL  $1: expected $2, got $3"; failures=$((failures + 1)); fi
}

phase_verdicts() {  # the phases' verdicts of a JSON report, comma-separated
    "$PYTHON" -c 'import json, sys; print(",".join(p["verdict"] for p in json.load(open(sys.argv[1]))["phases"]))' "$1" 2>/dev/null || echo "no report"
}

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "no CUDA device: this script runs the CUDA paths only"; exit 2; }

timeout 900 "${LORA_DOCTOR[@]}" check fixtures/checkpoint-500 --plan swift-colocate-lora --dtype bfloat16 --json "$OUT/demo.json" -q
expect "demo in bf16 (exit)" 1 $?
expect "demo in bf16 (phases)" "ok,double_counted" "$(phase_verdicts "$OUT/demo.json")"

timeout 900 "${LORA_DOCTOR[@]}" check fixtures/checkpoint-500 --plan swift-fixed --json "$OUT/healthy.json" -q
expect "healthy plan, default dtype (exit)" 0 $?
expect "default dtype on CUDA" "bfloat16" "$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["engine"]["options"]["dtype"])' "$OUT/healthy.json" 2>/dev/null)"

timeout 900 "${LORA_DOCTOR[@]}" check fixtures/checkpoint-500 --previous fixtures/checkpoint-250 --plan merged-no-cache-reset --json "$OUT/stale.json" -q
expect "merged push without a cache reset (exit)" 1 $?
expect "merged push without a cache reset (phases)" "stale_cache" "$(phase_verdicts "$OUT/stale.json")"

timeout 900 "${LORA_DOCTOR[@]}" check fixtures/checkpoint-500 --dtype float32 -q 2>"$OUT/float32.err"
expect "float32 LoRA engine on CUDA refused (exit)" 2 $?

# A trainer's engine, in this process: asleep, then awake; then one on Model Runner V2.
probe() {  # probe RUNNER(v1|v2) SLEEP(0|1) → prints "verdict|not_measured keys"
    VLLM_USE_V2_MODEL_RUNNER=$([ "$1" = v2 ] && echo 1 || echo 0) timeout 600 "$PYTHON" - "$2" <<'EOF' 2>"$OUT/probe.err" | tail -1
import sys, time
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from vllm import LLM
from vllm.lora.request import LoRARequest
import lora_doctor
from lora_doctor.engine.driver import WORKER_EXTENSION

sleep = sys.argv[1] == "1"
llm = LLM(model="fixtures/tiny-qwen2", dtype="bfloat16", enable_lora=True, max_lora_rank=16, max_logprobs=-1,
          enable_sleep_mode=sleep, worker_extension_cls=WORKER_EXTENSION, gpu_memory_utilization=0.3)
policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("fixtures/tiny-qwen2", dtype=torch.bfloat16), "fixtures/checkpoint-500")
request = LoRARequest("policy", 1, "fixtures/checkpoint-500")
if sleep:
    llm.sleep(level=1)
started = time.perf_counter()
result = lora_doctor.probe(llm, policy, lora_request=request, base_dir="fixtures/tiny-qwen2")
print(f"{result.verdict}|{','.join(sorted(result.not_measured))}|{time.perf_counter() - started:.0f}s", file=sys.stderr)
print(f"{result.verdict}|{','.join(sorted(result.not_measured))}")
EOF
}

got=$(probe v1 1)
expect "probe on a sleeping engine (verdict|not measured)" "unresolved|engine" "${got:-crashed: $(tail -1 "$OUT/probe.err")}"
got=$(probe v2 0)
expect "probe under Model Runner V2 (verdict|not measured)" "ok|capture" "${got:-crashed: $(tail -1 "$OUT/probe.err")}"

echo "$failures case(s) differ from what the CPU build's suite shows"
[ "$failures" -eq 0 ]
