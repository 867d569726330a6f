#!/usr/bin/env bash
# ms-swift GRPO, colocated vLLM with LoRA (`--vllm_enable_lora true`), resumed from a LoRA
# checkpoint, probed by lora-doctor after every sync:
#
#     examples/swift_grpo_probe.sh OUTPUT_DIR
#
# Resumes the bundled fixture run (tiny-qwen2 + checkpoint-500, step 500) for two GRPO steps.
# The two lora-doctor options: `--vllm_engine_kwargs` builds the engine so that it can be measured
# (full-vocabulary log-probs, lora-doctor's worker extension) and `--external_plugins` switches the
# probe on (`python -m lora_doctor.integrations.ms_swift` prints the plugin's path). Its figures go
# to ms-swift's logs (OUTPUT_DIR/v*/logging.jsonl); with LORA_DOCTOR_RESULTS=FILE the full result of
# every probe also goes to FILE. A failed probe stops the run.
#
# LEARNING_RATE: the optimizer's (default 1e-6).
# SWIFT_PYTHON: the interpreter ms-swift is installed for (default: python); `-m swift.cli.main` is
# what the `swift` command runs.
set -euo pipefail
output_dir=$1
root=$(cd "$(dirname "$0")/.." && pwd)
export LORA_DOCTOR_PROMPTS=${LORA_DOCTOR_PROMPTS:-$root/fixtures/prompts.jsonl}

"${SWIFT_PYTHON:-python}" -m swift.cli.main rlhf \
    --rlhf_type grpo \
    --model "$root/fixtures/tiny-qwen2" --model_type qwen2 --template default --torch_dtype float32 \
    --tuner_type lora --resume_from_checkpoint "$root/fixtures/checkpoint-500" --ignore_data_skip true \
    --dataset "$root/fixtures/prompts.jsonl" --reward_funcs format repetition \
    --use_vllm true --vllm_mode colocate --vllm_enable_lora true --sleep_level 0 \
    --vllm_max_model_len 256 --vllm_enforce_eager true \
    --vllm_engine_kwargs '{"load_format": "auto", "max_logprobs": -1, "worker_extension_cls": "lora_doctor.engine.worker.LoraDoctorWorker"}' \
    --external_plugins "$root/lora_doctor/integrations/swift_plugin/lora_doctor_swift.py" \
    --num_generations 2 --per_device_train_batch_size 2 --steps_per_generation 1 --max_completion_length 16 \
    --max_steps 503 --learning_rate "${LEARNING_RATE:-1e-6}" --logging_steps 1 --save_strategy no --report_to none \
    --dataloader_num_workers 0 --dataset_num_proc 1 \
    --output_dir "$output_dir"
