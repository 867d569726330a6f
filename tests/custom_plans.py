"""Custom sync plans used by the tests: each exercises part of the plan API."""


def half_scale_merge(sync):
    """Merged weights at half the LoRA scale (the LoRA scaling dropped by a trainer)."""
    sync.load_merged(scale=0.5)
    sync.probe("merged-half")


def layer0_merged_without_adapter(sync):
    """Only decoder layer 0 merged; generation without the adapter: layer 1's LoRA is missing."""
    sync.load_base()
    sync.add_adapter()
    sync.probe("base+adapter")
    sync.load_merged(decoder_layers={0})
    sync.drop_adapter()
    sync.probe("layer0-merged")


def previous_then_current_inplace(sync):
    """The previous adapter, then the current one under the same id with load_inplace=True."""
    sync.reload_from_disk()
    sync.add_adapter(id=3, weights="previous")
    sync.add_adapter(id=3, weights="current", load_inplace=True)
    sync.probe("inplace")


def float32_master_merge(sync):
    """A merge in float32 master weights, rounded once by the engine; then the adapter on top."""
    # round(W0 + ΔW) in a bf16 engine, not PEFT's bf16 merge round(round(W0) + round(ΔW)).
    sync.load_merged(dtype="float32")
    sync.probe("full-merged-fp32-master")
    sync.add_adapter()
    sync.probe("adapter-on-top")


def adapter_from_the_environment(sync):
    """An adapter sync of the folder in LORA_DOCTOR_TEST_ADAPTER (a trainer pushing its own folder)."""
    import os

    sync.reload_from_disk()
    sync.add_adapter(weights=os.environ["LORA_DOCTOR_TEST_ADAPTER"])
    sync.probe("adapter")
