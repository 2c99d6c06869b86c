"""The block types `leanlm quantize` can write, each with its quantizer (blocks.py's interface)."""

from __future__ import annotations

from gguf import GGMLQuantizationType

from leanlm.quant.blocks import BlockFormat
from leanlm.quant.kquants import KQUANT_FORMATS
from leanlm.quant.legacy import LEGACY_FORMATS

FORMATS: dict[GGMLQuantizationType, BlockFormat] = {**LEGACY_FORMATS, **KQUANT_FORMATS}


def get_format(qtype: GGMLQuantizationType) -> BlockFormat:
    """The quantizer for `qtype` (legacy.py: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; kquants.py: Q4_K, Q5_K, Q6_K)."""
    if qtype not in FORMATS:
        names = ", ".join(q.name for q in FORMATS)
        raise ValueError(f"leanlm cannot write GGML type {qtype.name} (it can write {names})")
    return FORMATS[qtype]
