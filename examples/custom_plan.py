"""A framework's own sync path, described for lora-doctor.

Run it with:  lora-doctor check output/checkpoint-500 --plan examples/custom_plan.py:inplace_adapter_sync
"""


def inplace_adapter_sync(sync):
    """Disk base, then the adapter re-synced in place under one id at every step."""
    sync.reload_from_disk()                     # the engine starts from the base on disk
    sync.add_adapter(id=7)                      # step 1: the adapter under id 7
    sync.probe("step-1")
    sync.add_adapter(id=7, load_inplace=True)   # step 2: same id, weights replaced in place
    sync.probe("step-2")
