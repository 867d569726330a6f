"""ms-swift plugin: `swift rlhf ... --external_plugins <this file>` probes the colocated engine after its syncs.

ms-swift imports this file while it parses the command line (`_import_external_plugins` of the
arguments being built). It registers lora-doctor's callback in ms-swift's `callbacks_map` and adds
it to the `callbacks` of those arguments, as `--callbacks lora_doctor` would, so the one option is
enough.
"""

import inspect

from swift.callbacks import callbacks_map

from lora_doctor.integrations.ms_swift import CALLBACK_NAME, SwiftProbe

callbacks_map[CALLBACK_NAME] = SwiftProbe


def _arguments_being_parsed():
    for frame in inspect.stack():
        candidate = frame.frame.f_locals.get("self")
        if hasattr(candidate, "external_plugins") and isinstance(getattr(candidate, "callbacks", None), list):
            return candidate
    raise RuntimeError("lora-doctor's ms-swift plugin must be loaded by `swift ... --external_plugins`")


_arguments = _arguments_being_parsed()
if CALLBACK_NAME not in _arguments.callbacks:
    _arguments.callbacks.append(CALLBACK_NAME)
