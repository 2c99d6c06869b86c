"""Tokenizer built from GGUF metadata, giving the same token ids as llama.cpp.

* ``gpt2`` vocabularies (byte-level BPE): a `tokenizers` BPE with the file's merges behind the
  pre-tokenizer regexes llama.cpp uses for ``tokenizer.ggml.pre`` (gguf_vocab.py; each regex splits the
  pieces of the previous one, keeping matches and gaps; then bytes map to GPT-2 characters).
* ``llama`` vocabularies (SentencePiece): llama.cpp's score-driven merge (spm.py). Text is cut before every
  ``▁`` that no vocabulary entry can span, so words merge (and are cached) independently with the same result.

Special tokens are cut out first, as llama.cpp's ``tokenizer_st_partition`` does: user-defined
tokens always, control tokens only with ``special=True``, longest first. Decoding follows
``llama_token_to_piece``. Like llama.cpp, bytes a vocabulary has no token for (SmolLM lacks
e.g. 0x04 and 0xF1) produce no ids, so such text does not survive a round trip.
"""

from __future__ import annotations

import codecs
from array import array
from collections.abc import Sequence
from typing import Any

from leanlm.errors import LeanLMError, UnsupportedError
from leanlm.formats.chat_template import render_chat_template
from leanlm.formats.gguf_vocab import (
    BYTE,
    CONTROL,
    CONTROL_LOOKING,
    END_OF_TURN,
    NORMAL,
    PRE_ALIASES,
    PRE_TOKENIZERS,
    UNKNOWN,
    USER_DEFINED,
    byte_decoder,
)
from leanlm.formats.spm import spm_merge

_SENTINEL = "\x00leanlm-missing"  # stands for characters the vocabulary lacks (not a byte-level string)


class Tokenizer:
    """Text <-> token ids for one GGUF model, matching llama.cpp."""

    def __init__(self, md: dict[str, Any]) -> None:
        kind = md.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise UnsupportedError(f"tokenizer type {kind!r} is not supported (only 'gpt2' and 'llama')")
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(md["tokenizer.ggml.tokens"])]
        n = self.vocab_size = len(tokens)
        types = list(md.get("tokenizer.ggml.token_type") or [NORMAL] * n)
        self._kind = kind
        self._vocab = {t: i for i, t in enumerate(tokens)}
        self._tokens = tokens
        self.architecture: str = md.get("general.architecture", "")
        self.chat_template: str | None = md.get("tokenizer.chat_template")

        def special_id(key: str, default: int | None) -> int | None:
            v = md.get(f"tokenizer.ggml.{key}", default)
            return v if v is not None and 0 <= v < n else None

        spm = kind == "llama"
        self.bos_id = special_id("bos_token_id", 1 if spm else 11)
        self.eos_id = special_id("eos_token_id", 2 if spm else 11)
        self._unk_id = special_id("unknown_token_id", 0 if spm else None)
        add_bos_default = True
        if not spm:
            pre = md.get("tokenizer.ggml.pre", "")
            pre = PRE_ALIASES.get(pre, pre)
            if pre not in PRE_TOKENIZERS:
                raise UnsupportedError(f"pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)})")
            regexes, ignore_merges, add_bos_default = PRE_TOKENIZERS[pre]
            self._bpe = (self._merge_pairs(md.get("tokenizer.ggml.merges") or []), regexes, ignore_merges)
            self._hf = self._build_bpe(*self._bpe)
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and self.bos_id is not None
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", spm))

        for t in CONTROL_LOOKING & self._vocab.keys():
            types[self._vocab[t]] = CONTROL
        ends = {self._vocab[t] for t in END_OF_TURN & self._vocab.keys()}
        if {"<|return|>", "<|call|>"} <= self._vocab.keys():
            ends.discard(self._vocab.get("<|end|>", -1))  # gpt-oss: <|end|> closes a message, not the turn
        listed = (special_id("eot_token_id", None), special_id("eom_token_id", None), self.eos_id)
        self.eos_ids: frozenset[int] = frozenset(ends | {i for i in listed if i is not None})
        self._types = bytes(types)  # small ints: a byte each (a list of 262k would be 2 MiB of pointers)
        self._skip = frozenset(i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN))

        # special tokens by the first two characters of their text, for a quick presence check
        self._special_index: dict[str, list[tuple[int, int, str, bool]]] = {}
        for i, ty in enumerate(types):
            if ty in (CONTROL, USER_DEFINED, UNKNOWN):
                t = tokens[i]
                entry = (-len(t.encode()), i, t, ty == USER_DEFINED)
                self._special_index.setdefault(t[:2], []).append(entry)
        if spm:
            # fp32 in the file: an array of 4 bytes each instead of 262k Python floats (7 MiB for Gemma 3)
            self._scores = array("f", md.get("tokenizer.ggml.scores") or [0.0] * n)
            # "x▁" pairs that occur inside some token: a merge can only cross a ▁ preceded by x
            self._bridges = {t[j - 1:j + 1] for t in tokens if "▁" in t[1:] for j in range(1, len(t)) if t[j] == "▁"}
            self._byte_ids = [self._vocab.get(f"<0x{b:02X}>", self._vocab.get(chr(b), self._unk_id))
                              for b in range(256)]
            self._cache: dict[str, list[int]] = {}
        self._pieces: tuple[bytes, array] | None = None  # every token's bytes, concatenated, and offsets

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any]) -> Tokenizer:
        if "tokenizer.ggml.tokens" not in md:
            raise LeanLMError("the model file has no tokenizer (tokenizer.ggml.tokens is missing)")
        return cls(md)

    def _merge_pairs(self, merges: list[str]) -> array:
        """The merges "a b" whose parts and result are tokens, as token ids a0, b0, a1, b1, ..."""
        vocab, pairs = self._vocab, array("i")
        for m in merges:
            k = m.find(" ", 1)
            if k > 0 and m[:k] in vocab and m[k + 1:] in vocab and m[:k] + m[k + 1:] in vocab:
                pairs.extend((vocab[m[:k]], vocab[m[k + 1:]]))
        return pairs

    def _build_bpe(self, pairs: array, regexes: tuple[str, ...], ignore_merges: bool) -> Any:
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tokens = self._tokens
        merges = [(tokens[a], tokens[b]) for a, b in zip(pairs[::2], pairs[1::2], strict=True)]
        # a character missing from the vocabulary stays a symbol that blocks merges, then yields no id (as in
        # llama.cpp); tokenizers would drop it before merging, so map it to a sentinel id and filter that out
        hf = HFTokenizer(models.BPE(vocab={**self._vocab, _SENTINEL: self.vocab_size}, merges=merges,
                                    unk_token=_SENTINEL, ignore_merges=ignore_merges))
        steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
        return hf

    # Saved with the model (weight_cache.py): the BPE as its inputs, not as `tokenizers`' own JSON, whose parse
    # would be most of a cached load; the vocabulary is rebuilt from the token list.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("_hf", "_vocab")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._vocab = {t: i for i, t in enumerate(self._tokens)}
        if self._kind == "gpt2":
            self._hf = self._build_bpe(*self._bpe)

    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Cut `text` around special tokens like llama.cpp: longest token text first."""
        keys = {text[i:i + 2] for i in range(len(text))} | set(text)
        found = sorted(e for k in keys & self._special_index.keys() for e in self._special_index[k]
                       if (special or e[3]) and e[2] in text)
        frags: list[str | int] = [text] if text else []
        for _, tid, tok, _ in found:
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, str) and tok in f:
                    for j, part in enumerate(f.split(tok)):
                        if j:
                            out.append(tid)
                        if part:
                            out.append(part)
                else:
                    out.append(f)
            frags = out
        return frags

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        try:
            text.encode()
        except UnicodeEncodeError:  # surrogates: pair them up, lone ones become U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        prev_special = True
        for frag in self._partition(text, special):
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
            elif self._kind == "gpt2":
                ids.extend(i for i in self._hf.encode(frag, add_special_tokens=False).ids if i != self.vocab_size)
            else:
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                for word in self._spm_words(frag.replace(" ", "▁")):
                    ids.extend(self._spm_word(word))
                prev_special = False
        return ids

    def _spm_words(self, s: str) -> list[str]:
        """Cut before every ▁ that no vocabulary entry can contain together with the char before it."""
        words, start, i = [], 0, s.find("▁", 1)
        while i != -1:
            if s[i - 1:i + 1] not in self._bridges:
                words.append(s[start:i])
                start = i
            i = s.find("▁", i + 1)
        words.append(s[start:])
        return words

    def _spm_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = spm_merge(word, self._vocab, self._scores, self._byte_ids)
            if len(word) <= 64:
                if len(self._cache) >= 100_000:
                    self._cache.clear()
                self._cache[word] = ids
        return ids

    def _build_pieces(self) -> tuple[bytes, array]:
        """llama_token_to_piece(special=True) for every id: one bytes object and the offset of each piece (a
        list of 262k bytes objects would hold ~14 MiB for Gemma 3)."""
        table = str.maketrans({c: chr(b) for c, b in byte_decoder().items()})

        def piece(tok: str, ty: int) -> bytes:
            if ty == NORMAL and self._kind == "llama":
                return tok.replace("▁", " ").encode()
            if ty == NORMAL:
                gpt2 = tok.translate(table)
                return gpt2.encode("latin-1") if max(gpt2) < "\u0100" else tok.encode()
            if ty == BYTE and len(tok) == 6 and tok.startswith("<0x"):
                return bytes([int(tok[3:5], 16)])
            return tok.encode() if ty in (CONTROL, USER_DEFINED, UNKNOWN) else b""

        blob, offsets = bytearray(), array("q", [0])
        for tok, ty in zip(self._tokens, self._types):  # no list of pieces on the way: its peak is the saving
            blob += piece(tok, ty)
            offsets.append(len(blob))
        return bytes(blob), offsets

    def token_bytes(self, id: int) -> bytes:
        if self._pieces is None:
            self._pieces = self._build_pieces()
        if not 0 <= id < self.vocab_size:
            raise LeanLMError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        blob, offsets = self._pieces
        return blob[offsets[id]:offsets[id + 1]]

    def is_special(self, id: int) -> bool:
        """True for control/unknown tokens, which decode(skip_special=True) leaves out."""
        return id in self._skip

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`. With skip_special, control tokens are left out and (like llama.cpp) the space
        SentencePiece puts in front of the text is removed for add_space_prefix vocabularies."""
        ids = list(ids)
        if skip_special:
            if self.add_space_prefix and ids and ids[0] == self.bos_id:
                ids = ids[1:]
            ids = [i for i in ids if i not in self._skip]
        data = b"".join(self.token_bytes(i) for i in ids)
        if skip_special and self.add_space_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation; a leading BOS is left out when encode() adds one (as llama.cpp does)."""
        bos = self._tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self._tokens[self.eos_id] if self.eos_id is not None else ""
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=bos, eos_token=eos, architecture=self.architecture)
        if self.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text


class StreamDecoder:
    """Incremental decode for streaming: only ever returns whole UTF-8 characters."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        if self._tok.is_special(id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(id))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
