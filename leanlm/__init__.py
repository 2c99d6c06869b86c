"""leanlm: a lean, fast LLM runtime.

    llm = leanlm.load("smollm2-135m")
    for piece in llm.generate("Once upon a time", max_tokens=32):
        print(piece, end="")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "load", "pull"]

if TYPE_CHECKING:
    from leanlm.formats.hub import pull
    from leanlm.llm import LLM, load
    from leanlm.runtime.sampling import SamplingParams


def __getattr__(name: str) -> Any:  # imported lazily so `leanlm --help` does not pay for torch
    if name in ("LLM", "load"):
        from leanlm import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from leanlm.runtime.sampling import SamplingParams

        return SamplingParams
    if name == "pull":
        from leanlm.formats.hub import pull

        return pull
    raise AttributeError(name)
