"""Proposers for speculative decoding (speculative.py): who guesses the next k tokens.

- `PromptLookup`: n-gram matching against the prompt and the text so far; no model at all.
- `DraftModel`: a smaller model with the target's vocabulary, run autoregressively for k steps.
- `early_exit(model, n)`: the target's own first n layers (then its final norm and head), as a DraftModel;
  shares the target's weights, keeps its own small cache.
A draft model keeps a KV cache of the committed tokens it has seen; after a round rejects some of its
drafts, the tokens it fed that are no longer committed are fed again (see `DraftModel.propose`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer
from leanlm.runtime.generate import prefill
from leanlm.runtime.logits import Chain
from leanlm.runtime.steps.eager import DecodeStep, decode_step


class PromptLookup:
    """Draft the tokens that followed the latest earlier occurrence of the text's last n-gram.

    Example, ngram 2, tokens [5, 6, 7, 8, 5, 6]: the suffix (5, 6) last occurred ending at index 2, so the
    draft is what came next there: [7, 8, 5, ...]. Longer n-grams are tried first (max_ngram down to 1).
    The index of n-gram -> end of its latest occurrence grows with the text (committed tokens only grow).
    """

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self.index: dict[tuple[int, ...], int] = {}
        self.seen = 0  # tokens[:seen - 1] have been indexed as n-gram ends

    def propose(self, tokens: Sequence[int], k: int, chain: Chain,
                generator: torch.Generator | None) -> tuple[list[int], None]:
        if self.seen > len(tokens):  # a different text: start over
            self.index, self.seen = {}, 0
        for end in range(max(self.seen, 1), len(tokens)):  # n-grams ending before the last token
            for n in range(1, self.max_ngram + 1):
                if end >= n:
                    self.index[tuple(tokens[end - n:end])] = end
        self.seen = len(tokens)
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            end = self.index.get(tuple(tokens[-n:]))
            if end is not None:
                return list(tokens[end:end + k]), None
        return [], None


class DraftModel:
    """A draft model with its own cache, for one generation (the text it is shown only grows). step: its decode
    step (compiled.py), eager by default."""

    def __init__(self, model: Transformer, max_len: int, chunk: int = 512, step: DecodeStep = decode_step,
                 vocab_size: int | None = None) -> None:
        self.model, self.step, self.chunk = model, step, chunk
        self.vocab_size = vocab_size or model.cfg.vocab_size  # the target's (q is padded to it)
        self.cache = ModelCache.for_model(model, 1, max_len, chunk)
        self.fed: list[int] = []  # the tokens whose keys are in the cache, at positions 0..len-1
        self.committed = 0  # fed[:committed] were committed tokens when last proposed (so they still are)

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], k: int, chain: Chain,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Drafts from this model's distribution under the sequence's chain (penalties see the drafts so far)."""
        if k <= 0:
            return [], None
        keep = min(self.committed, len(tokens))  # committed text only grows: compare just the drafts fed since
        while keep < len(self.fed) and keep < len(tokens) and self.fed[keep] == tokens[keep]:
            keep += 1
        keep = min(keep, len(tokens) - 1)  # the last token is always fed: its logits give the first draft
        if len(tokens) + k > self.cache.max_len:
            raise LeanLMError("the draft model's cache is too small for this generation")
        device, model = self.model.device, self.model
        rest = list(tokens[keep:])
        self.cache.kv_len = keep  # positions from keep on are written again: nothing past them is read
        logits = prefill(model, self.cache, torch.tensor([rest], device=device), keep, self.chunk)
        del self.fed[keep:]  # no copy of the whole text per round
        self.fed.extend(rest)
        self.committed = len(tokens)
        drafts: list[int] = []
        qs = []
        for i in range(k):
            if chain.params.greedy:
                d = int(chain.apply(logits, tokens, drafts)[0].argmax())
            else:
                q = chain.probs(logits[0], tokens, drafts)
                d = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            drafts.append(d)
            if i == k - 1:
                break
            pos = len(self.fed)
            self.fed.append(d)
            logits = self.step(model, self.cache, torch.tensor([[d]], device=device),
                               torch.tensor([[pos]], device=device), pos + 1)
        if chain.params.greedy:
            return drafts, None
        q = torch.stack(qs)
        if q.shape[1] < self.vocab_size:
            q = torch.nn.functional.pad(q, (0, self.vocab_size - q.shape[1]))
        return drafts, q[:, :self.vocab_size]


def early_exit(model: Transformer, n_layers: int) -> Transformer:
    """A Transformer that runs the first n_layers of `model` and then its final norm and head (weights shared)."""
    if not 1 <= n_layers < model.cfg.n_layers:
        raise LeanLMError(f"early exit needs 1 <= layers < {model.cfg.n_layers}, got {n_layers}")
    view = Transformer.__new__(Transformer)
    nn.Module.__init__(view)
    view.cfg = replace(model.cfg, n_layers=n_layers, layer_windows=model.cfg.layer_windows[:n_layers])
    view.tok_embeddings, view.norm, view.output = model.tok_embeddings, model.norm, model.output
    view.layers = nn.ModuleList(list(model.layers)[:n_layers])
    view.kv_cache, view.plan = model.kv_cache, model.plan
    return view


def check_vocab(target_tok: Any, draft_tok: Any, target_vocab: int, draft_vocab: int) -> None:
    """Refuse a draft whose tokens mean something else than the target's (tokenizers and model vocab sizes:
    the draft's distributions are padded to the target's logits, never cut)."""
    if target_tok.vocab_size != draft_tok.vocab_size or draft_vocab > target_vocab:
        raise LeanLMError(f"the draft model's vocabulary ({draft_tok.vocab_size} tokens) differs from the "
                          f"target's ({target_tok.vocab_size}): speculative decoding needs the same tokenizer")
    for i in range(target_tok.vocab_size):
        if target_tok.token_bytes(i) != draft_tok.token_bytes(i):
            raise LeanLMError(f"the draft model's token {i} differs from the target's: speculative decoding "
                              "needs the same tokenizer")
