"""What a checkpoint holds: the adapter folder and its base model, read from the files alone.

`checkpoint` resolves the folders and the LoRA spec; `inventory` sorts every tensor PEFT wrote (LoRA
factors, embedding LoRA, trained full copies) and lists the base's weights through its index;
`lora_delta` forms ΔW with PEFT's scaling; `names` joins adapter, base and engine module names;
`dtypes` is the one table of dtype names; `weight_files` reads safetensors in bounded chunks;
`base_slices` reads blocks of the base's weights for the per-module read. No vLLM import. Nothing
outside this wing opens a file of a checkpoint or its base (docs/checkpoint-path.md).
"""
