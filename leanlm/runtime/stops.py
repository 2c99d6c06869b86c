"""Stop strings over streamed text: emit what can no longer become a stop string, hold the rest."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Feed text pieces; get back the text safe to emit and whether a stop string was hit.

    Text that could still be the start of a stop string is held back until the next piece
    decides it. The stop string itself is never emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if not self.stops:
            return piece
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut]
        keep = 0  # longest suffix of text that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
