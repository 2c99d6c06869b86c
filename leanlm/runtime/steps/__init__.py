"""Decode and verify steps: `select` builds the step for a model and kind from the first backend that serves it.

Backends, in the order tried: the C++ decoder (cpp.py), the compiled graph (compiled.py), eager PyTorch
(eager.py, which also holds the interface: `StepKind`, `Step`).
"""

from __future__ import annotations

from collections.abc import Callable

from leanlm.errors import LeanLMError
from leanlm.model.transformer import Transformer
from leanlm.runtime.steps.eager import Step, StepKind

MODES = ("auto", "on", "off")  # auto: use a saved compiled step if there is one; on: compile when missing; off: eager


def select(model: Transformer, kind: StepKind, mode: str = "auto", log: Callable[[str], None] | None = None) -> Step:
    """The step for `model` and `kind`: the first backend whose `supports` says yes and whose `build` gives a step
    (a compiled step may be missing on disk or fail to load); mode "off" leaves only the eager one."""
    from leanlm.runtime.steps import compiled, cpp, eager  # the compiled backend is loaded only here

    if mode not in MODES:
        raise LeanLMError(f"unknown compile mode '{mode}' (choose {', '.join(MODES)})")
    for backend in (cpp, compiled, eager):
        if (mode != "off" or backend is eager) and backend.supports(model, kind, model.plan):
            step = backend.build(model, kind, mode, log)
            if step is not None:
                return step
    raise AssertionError("the eager backend serves every model")
