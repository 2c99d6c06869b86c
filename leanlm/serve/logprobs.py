"""Log-probabilities in the two OpenAI shapes: chat (`content` entries) and legacy completions (parallel lists)."""

from __future__ import annotations

from typing import Any

import torch

from leanlm.llm import LLM
from leanlm.serve.sequence import Output

TokenLogprob = tuple[int, float | None, list[tuple[int, float]] | None]  # token, its logprob, top alternatives


class Logprobs:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer

    def piece(self, t: int) -> str:
        return self.tok.token_bytes(t).decode("utf-8", errors="replace")

    def _entry(self, t: int, lp: float | None) -> dict[str, Any]:
        return {"token": self.piece(t), "logprob": lp, "bytes": list(self.tok.token_bytes(t))}

    def chat_entry(self, t: int, lp: float | None, top: list[tuple[int, float]] | None) -> dict[str, Any]:
        return {**self._entry(t, lp), "top_logprobs": [self._entry(i, v) for i, v in (top or [])]}

    def text(self, items: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """Legacy completions format: tokens, token_logprobs, top_logprobs (one dict per position), text_offset."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in items:
            out["tokens"].append(self.piece(t))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self.piece(i): v for i, v in top})
            out["text_offset"].append(offset)
            offset += len(out["tokens"][-1])
        return out

    def scored(self, o: Output) -> bool:
        """Does this event carry a token that belongs in logprobs (not an end-of-sequence token)?"""
        return o.token is not None and o.logprob is not None and not (
            o.finish_reason == "stop" and o.token in self.tok.eos_ids and not o.text)

    def prompt(self, llm: LLM, ids: list[int], k: int) -> dict[str, Any]:
        """Legacy logprobs of a prompt's own tokens (the first has none), from one forward pass: what `echo`
        returns. Run it on the engine thread (Engine.run_job)."""
        logp = torch.log_softmax(llm.logits(ids).float(), -1)  # (T, V): row t predicts token t + 1
        items: list[TokenLogprob] = [(ids[0], None, None)]
        for t in range(1, len(ids)):
            top = None
            if k > 0:
                v, i = logp[t - 1].topk(k)
                top = list(zip(i.tolist(), v.tolist()))
            items.append((ids[t], float(logp[t - 1, ids[t]]), top))
        return self.text(items)
