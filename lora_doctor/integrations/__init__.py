"""lora-doctor inside real trainers: the engine, the LoRA request and the sync cadence each one uses.

- `lora_doctor.integrations.trl_grpo`: TRL's `GRPOTrainer` with a colocated vLLM engine;
- `lora_doctor.integrations.ms_swift`: ms-swift's GRPO trainer with a colocated vLLM engine,
  switched on from the `swift rlhf` command line (`python -m lora_doctor.integrations.ms_swift`
  prints the option).
"""
