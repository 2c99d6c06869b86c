"""Tokenizer of a Hugging Face checkpoint folder, with the same interface as `leanlm.formats.tokenizer.Tokenizer`.

Encoding and decoding run the folder's ``tokenizer.json`` through the `tokenizers` library, so ids and
text match ``transformers.AutoTokenizer``. Settings come from the files beside it:

* ``tokenizer_config.json``: ``chat_template`` (a string, or a list of ``{name, template}`` whose
  ``default`` is used; a ``chat_template.jinja`` file takes priority), ``bos_token`` / ``eos_token``
  (strings or ``{"content": ...}``), ``add_bos_token``, and the named special tokens, which are made
  special added tokens as transformers does.
* ``generation_config.json``: every ``eos_token_id`` stops generation; ``config.json`` supplies
  eos/bos ids the other files lack, and ``architectures[0]`` for `architecture`.

Without ``add_bos_token``, BOS is added when the tokenizer's post-processor puts it in front (Llama,
Mistral, Gemma do; Qwen2 doesn't). `token_bytes` follows the decoder (ByteLevel: GPT-2's byte
alphabet; Replace/Metaspace: ``▁`` -> space; ByteFallback: ``<0xNN>`` -> that byte), inferring one from
the pre-tokenizer and model when the file has none. Streaming output therefore keeps the space a
SentencePiece decoder strips from the very first token; `decode` strips it, like transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leanlm.errors import LeanLMError
from leanlm.formats.chat_template import render_chat_template
from leanlm.formats.gguf_vocab import END_OF_TURN, byte_decoder

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_BYTES = byte_decoder()  # GPT-2's byte-level alphabet, char -> byte
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LeanLMError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise LeanLMError(f"{path} is not a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> list[int]:
    """eos_token_id / bos_token_id of a config: an int, a list of ints, or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, dict):  # {name: template}
        template = template.get("default")
    elif isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _state(component: Any) -> dict[str, Any]:
    """The JSON settings of a tokenizers normalizer / pre-tokenizer / decoder (empty for None)."""
    if component is None:
        return {}
    try:
        return json.loads(component.__getstate__())
    except Exception:  # an unexpected binding: treat as unknown
        return {}


def _flatten(state: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The steps of a component, with Sequence(...) expanded."""
    if state.get("type") == "Sequence":
        return [s for sub in state.get(key, []) for s in _flatten(sub, key)]
    return [state] if state else []


class HFTokenizer:
    """Text <-> token ids for a Hugging Face checkpoint folder, matching transformers."""

    def __init__(self, hf: Any, config: dict[str, Any], generation: dict[str, Any], model_config: dict[str, Any],
                 chat_template: str | None) -> None:
        from tokenizers import AddedToken

        hf.no_truncation()
        hf.no_padding()
        self._hf = hf
        # named special tokens from the config become special added tokens (transformers does the same)
        added = {t.content: t for t in hf.get_added_tokens_decoder().values()}
        extra: list[Any] = []
        listed_added = config.get("added_tokens_decoder")
        for entry in (listed_added.values() if isinstance(listed_added, dict) else ()):
            if isinstance(entry, dict) and _token_text(entry) and entry["content"] not in added:
                extra.append(AddedToken(entry["content"], single_word=bool(entry.get("single_word")),
                                        lstrip=bool(entry.get("lstrip")), rstrip=bool(entry.get("rstrip")),
                                        normalized=bool(entry.get("normalized")), special=bool(entry.get("special"))))
        named = [config.get(k) for k in _NAMED_SPECIALS]
        for k in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(config.get(k), list):
                named.extend(config[k])
        for text in filter(None, map(_token_text, named)):
            if text not in added and all(t.content != text for t in extra):
                extra.append(AddedToken(text, special=True, normalized=False))
        for t in extra:
            (hf.add_special_tokens if t.special else hf.add_tokens)([t])

        vocab = hf.get_vocab(with_added_tokens=True)
        n = self.vocab_size = max(vocab.values(), default=-1) + 1
        self._special = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)
        self.chat_template = chat_template
        archs = model_config.get("architectures")
        self.architecture: str = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
        model_type = model_config.get("model_type")
        self._template_arch = model_type if isinstance(model_type, str) else self.architecture.lower()

        def lookup(key: str) -> tuple[str | None, int | None]:
            text = _token_text(config.get(key))
            return text, (vocab.get(text) if text is not None else None)

        def valid(ids: list[int]) -> list[int]:
            return [i for i in ids if 0 <= i < n]

        self._bos_text, bos = lookup("bos_token")
        self._eos_text, eos = lookup("eos_token")
        gen_eos = valid(_ids(generation.get("eos_token_id"))) or valid(_ids(model_config.get("eos_token_id")))
        # the token the post-processor puts in front of the text, if any
        enc = hf.encode("a", add_special_tokens=True)
        lead = enc.ids[0] if enc.ids and enc.special_tokens_mask[0] else None
        if bos is None:
            bos = lead
        if bos is None:
            bos = next(iter(valid(_ids(generation.get("bos_token_id")) + _ids(model_config.get("bos_token_id")))),
                       None)
        self.bos_id: int | None = bos
        self.eos_id: int | None = eos if eos is not None else next(iter(gen_eos), None)
        add_bos = config.get("add_bos_token")
        add_bos = add_bos if isinstance(add_bos, bool) else lead is not None and lead == bos
        self.add_bos: bool = add_bos and bos is not None

        ends = {vocab[t] for t in END_OF_TURN & vocab.keys()}
        if {"<|return|>", "<|call|>"} <= vocab.keys():
            ends.discard(vocab.get("<|end|>", -1))  # gpt-oss: <|end|> closes a message, not the turn
        listed = [*gen_eos, *([self.eos_id] if self.eos_id is not None else [])]
        self.eos_ids: frozenset[int] = frozenset(ends | set(listed))

        self._steps = self._decode_steps()
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_folder(cls, folder: Path) -> HFTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LeanLMError(f"{folder} has no tokenizer.json (leanlm needs the fast tokenizer file)")
        try:
            hf = RustTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for bad files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LeanLMError(f"{path} is not a valid tokenizer.json: {reason}") from e
        config = _read_json(folder / "tokenizer_config.json")
        return cls(hf, config, _read_json(folder / "generation_config.json"), _read_json(folder / "config.json"),
                   _chat_template(folder, config))

    def _decode_steps(self) -> list[dict[str, Any]]:
        """The per-token decoder steps; inferred from the pre-tokenizer/normalizer/model without a decoder."""
        steps = _flatten(_state(self._hf.decoder), "decoders")
        if steps:
            return steps
        pre = _flatten(_state(self._hf.pre_tokenizer), "pretokenizers")
        norm = _flatten(_state(self._hf.normalizer), "normalizers")
        if any(s.get("type") == "ByteLevel" for s in pre):
            return [{"type": "ByteLevel"}]
        if getattr(self._hf.model, "byte_fallback", False):
            steps.append({"type": "ByteFallback"})
        if any(s.get("type") == "Metaspace" for s in pre) or any(
                s.get("type") == "Replace" and s.get("content") == "▁" for s in norm):
            steps.insert(0, {"type": "Metaspace", "replacement": "▁"})
        return steps

    def _piece(self, token: str) -> bytes:
        """The bytes one token contributes to decoded text (before any strip of the first token)."""
        fused = False  # after Fuse the steps see the whole text: Strip then only trims its ends
        for step in self._steps:
            kind = step.get("type")
            if kind == "Fuse":
                fused = True
            elif kind == "Strip" and not fused:
                content, start, stop = step.get("content", " "), step.get("start", 0), step.get("stop", 0)
                n = len(token)
                lo = next((i for i in range(min(start, n)) if token[i] != content), min(start, n))
                hi = next((i for i in range(min(stop, n - lo)) if token[n - 1 - i] != content), min(stop, n - lo))
                token = token[lo:n - hi]
            elif kind == "Replace":
                pattern = step.get("pattern", {})
                if "String" in pattern:
                    token = token.replace(pattern["String"], step.get("content", ""))
                elif "Regex" in pattern:
                    token = re.sub(pattern["Regex"], step.get("content", ""), token)
            elif kind == "Metaspace":
                token = token.replace(step.get("replacement", "▁"), " ")
            elif kind == "ByteFallback" and _BYTE_TOKEN.fullmatch(token):
                return bytes([int(token[3:5], 16)])
            elif kind == "ByteLevel":
                if all(c in _BYTES for c in token):
                    return bytes(_BYTES[c] for c in token)
                return token.encode()
            elif kind == "WordPiece":
                prefix = step.get("prefix", "##")
                token = token[len(prefix):] if token.startswith(prefix) else " " + token
        return token.encode()

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of `text`. special=False keeps special-token text as plain text."""
        try:
            text.encode()
        except UnicodeEncodeError:  # surrogates: pair them up, lone ones become U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        self._hf.encode_special_tokens = not special
        ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token; empty for ids the tokenizer doesn't know (e.g. padded embedding rows)."""
        if id < 0:
            raise LeanLMError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        piece = self._pieces.get(id)
        if piece is None:
            token = self._hf.id_to_token(id)
            piece = self._pieces[id] = self._piece(token) if token is not None else b""
        return piece

    def is_special(self, id: int) -> bool:
        """True for special added tokens, which decode(skip_special=True) leaves out."""
        return id in self._special

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`, as transformers' decode(ids, skip_special_tokens=skip_special) gives it."""
        return self._hf.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation; a leading BOS is left out when encode() adds one (as for GGUF files)."""
        bos, eos = self._bos_text or "", self._eos_text or ""
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=bos, eos_token=eos, architecture=self._template_arch)
        if self.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text
