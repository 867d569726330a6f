"""The vLLM side: the engine lora-doctor drives (`driver`), the worker extension that runs next to the
model (`worker`, `capture`), what vLLM serves LoRA on and its rank limits (`serving`), how the engine is
sized for a check (`sizing`), and the shims that let vLLM run beside the rest (`compat`, `torchvision_ops`).
"""
