"""The merged-export audit: a merged export on disk compared with its base and adapter, without an engine.

`run.audit` pairs the export's tensors with the base's (`tensors`), streams them once in row chunks
(`stream`), sums each LoRA module's figures (`figures`; a bf16 export's in one compiled pass,
`bf16_sums`) and judges them with the check's verdict rules. No vLLM import.
"""

from .run import audit

__all__ = ["audit"]
