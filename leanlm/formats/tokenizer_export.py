"""Write a Hugging Face checkpoint's tokenizer (tokenizer.json + tokenizer_config.json) as GGUF metadata.

Two kinds of ``tokenizer.json`` BPE are written so that llama.cpp tokenizes like the HF tokenizer;
anything else raises `UnsupportedError`:

* Byte-level BPE (GPT-2 style: Llama 3, Qwen2, SmolLM) -> ``gpt2`` with the merges. llama.cpp splits
  text with the fixed regexes of a named pre-tokenizer (``tokenizer.ggml.pre``), so the file's steps
  (Split regexes, Digits, the regex of a ByteLevel step) and its BPE ``ignore_merges`` flag are looked up
  in leanlm's table of llama.cpp's pre-tokenizers. No exact match is an error, never a guess.
* SentencePiece-style BPE with ``<0xNN>`` byte fallback and ``▁`` for spaces (Llama 2, Mistral, Gemma)
  -> ``llama``. llama.cpp repeatedly merges the adjacent pair forming the highest-scoring token, so a
  token's score is minus the rank of the first merge creating it.

Special added tokens become CONTROL (llama.cpp then cuts them out of text only with special parsing on,
as HF does without ``split_special_tokens``), other added tokens USER_DEFINED (always cut out; llama.cpp
looks for them in the raw text, so with a ``' ' -> '▁'`` normalizer a normalized one is written with
spaces, as Gemma's whitespace tokens need). Ids missing from the tokenizer up to config.json's
``vocab_size`` become ``[PADn]`` (UNUSED).

Differences GGUF cannot express (HF and llama.cpp disagree there):
* an NFC normalizer (Qwen2): llama.cpp does not normalize, so only NFC text tokenizes the same;
* a Metaspace pre-tokenizer adds no ``▁`` to a text fragment that starts with a space, and with
  ``prepend_scheme: first`` none to fragments after an added token; llama.cpp's ``add_space_prefix`` puts
  a space in front of every fragment, as the legacy Prepend("▁") normalizer does (which therefore agrees);
* SentencePiece-style merges: llama.cpp merges any adjacent pair that forms a vocabulary token, HF only
  listed pairs. Files converted from SentencePiece list every split of every token and agree; a BPE
  trained by `tokenizers` could in principle differ (no case seen in the tests);
* added tokens: their lstrip/rstrip/single_word flags are not stored, and llama.cpp cuts out the longest
  token first where HF takes the leftmost-longest match.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from leanlm.errors import LeanLMError, UnsupportedError
from leanlm.formats.gguf_vocab import (
    BYTE,
    CONTROL,
    GPT2_REGEX,
    NORMAL,
    PRE_TOKENIZERS,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
)
from leanlm.formats.tokenizer_hf import HFTokenizer, _flatten, _read_json, _token_text

# a ByteLevel step with use_regex runs GPT-2's regex with a final "|\s+". That alternative only matches a
# single whitespace character before a non-space one, which llama.cpp keeps as its own (gap) piece anyway.
_BYTELEVEL_REGEX = GPT2_REGEX + r"|\s+"
_CASELESS = re.compile(r"\(\?i:([^()\[\]\\]*)\)")
# leanlm's names for llama.cpp's pre-tokenizers that llama.cpp itself spells differently
_LLAMA_CPP_NAME = {"gpt2": "gpt-2"}
_NO_MERGE = -1e9  # score of multi-character tokens no merge creates: llama.cpp forms them last, if at all


def _canonical(pattern: str) -> str:
    """One spelling per regex: ``(?i:'s|'ll)`` -> ``(?:'[sS]|'[lL][lL])`` as llama.cpp writes it."""
    def expand(m: re.Match[str]) -> str:
        if not m[1].isascii():  # non-ASCII case folding has no simple spelling: keep it (and match nothing)
            return m[0]
        return "(?:" + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in m[1]) + ")"

    pattern = _CASELESS.sub(expand, pattern)
    return GPT2_REGEX if pattern == _BYTELEVEL_REGEX else pattern


def _describe(step: dict[str, Any]) -> str:
    return json.dumps(step, ensure_ascii=False)


def _pre_name(steps: list[dict[str, Any]], ignore_merges: bool) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer `steps` (tokenizer.json pre_tokenizer steps)."""
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise UnsupportedError("the tokenizer is not byte-level BPE (its pre-tokenizer does not end with ByteLevel)")
    regexes: list[str] = []
    shown: list[str] = []  # the patterns as the file writes them, for the error message
    for step in steps:
        kind, pattern = step.get("type"), step.get("pattern") or {}
        if kind == "ByteLevel":
            if step is not steps[-1] or step.get("add_prefix_space"):
                raise UnsupportedError(f"pre-tokenizer step {_describe(step)} has no llama.cpp equivalent")
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
                shown.append(_BYTELEVEL_REGEX)
        elif kind == "Split" and "Regex" in pattern and step.get("behavior") == "Isolated" and not step.get("invert"):
            regexes.append(_canonical(pattern["Regex"]))
            shown.append(pattern["Regex"])
        elif kind == "Digits":
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
            shown.append(regexes[-1])
        else:
            raise UnsupportedError(f"pre-tokenizer step {_describe(step)} has no llama.cpp equivalent")
    for name, (known, ignore, _) in PRE_TOKENIZERS.items():
        if [_canonical(r) for r in known] == regexes and ignore == ignore_merges:
            return _LLAMA_CPP_NAME.get(name, name)
    listed = " then ".join(f"`{r}`" for r in shown) or "(none)"
    raise UnsupportedError(f"no llama.cpp pre-tokenizer splits text like the regex(es) {listed} with "
                           f"ignore_merges={ignore_merges} (known: {', '.join(PRE_TOKENIZERS)})")


def _space_prefix(norm: list[dict[str, Any]], pre: list[dict[str, Any]], vocab: dict[str, int]) -> bool:
    """Whether llama.cpp must add a space in front of text (add_space_prefix) to match the HF steps."""
    escaped = prefix = False
    for step in norm:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == "▁":
            prefix = True
        elif kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == "▁":
            escaped = True
        else:
            raise UnsupportedError(f"normalizer step {_describe(step)} has no llama.cpp equivalent")
    for step in pre:
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement") == "▁" and not escaped:
            escaped = True
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            prefix = scheme != "never"
            # HF then merges within "▁word" pieces only; llama.cpp across them when a token has an inner ▁
            if step.get("split", True) and any("▁" in t[1:] for t in vocab):
                raise UnsupportedError("Metaspace with split=true and tokens with an inner '▁' cannot be "
                                       "written for llama.cpp, which merges across words")
        elif kind == "Split" and step.get("pattern") == {"String": " "} and escaped:
            pass  # no spaces are left after the Replace normalizer (Gemma): a no-op
        else:
            raise UnsupportedError(f"pre-tokenizer step {_describe(step)} has no llama.cpp equivalent")
    if not escaped:
        raise UnsupportedError("SentencePiece-style BPE without ' ' -> '▁' (Metaspace or Replace) is not supported")
    return prefix


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json merges, written as "a b" (older files) or ["a", "b"]."""
    pairs = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        pairs.append((a, b))
    return pairs


def _vocab_size(folder: Path, model_vocab: dict[str, int], n_ids: int) -> int:
    """Rows of the model's embedding (config.json vocab_size), at least every tokenizer.json model id."""
    cfg = _read_json(folder / "config.json")
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    if not isinstance(size, int) or size <= 0:
        return n_ids
    top = max(model_vocab.values(), default=-1)
    if top >= size:
        raise LeanLMError(f"the tokenizer has token id {top} but config.json's vocab_size is {size}")
    return size


def _spm_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    return [-float(rank[t]) if t in rank else 0.0 if len(t) == 1 else _NO_MERGE for t in tokens]


def _add_eos(hf: Any, config: dict[str, Any], eos: int | None) -> bool:
    """tokenizer_config.json's add_eos_token, else whether the post-processor appends EOS."""
    value = config.get("add_eos_token")
    if isinstance(value, bool):
        return value
    enc = hf.encode("a", add_special_tokens=True)
    return bool(enc.ids) and enc.special_tokens_mask[-1] == 1 and enc.ids[-1] == eos


def write_tokenizer(w: gguf.GGUFWriter, folder: Path) -> None:
    """Add the tokenizer of HF checkpoint folder `folder` to `w` (see the module docstring)."""
    folder = Path(folder)
    tok = HFTokenizer.from_folder(folder)  # also makes config-named special tokens special added tokens
    hf = tok._hf
    spec = json.loads(hf.to_str())
    model = _bpe_model(spec)
    config = _read_json(folder / "tokenizer_config.json")
    model_vocab: dict[str, int] = model.get("vocab") or {}
    vocab = hf.get_vocab(with_added_tokens=True)
    added = hf.get_added_tokens_decoder()
    n = _vocab_size(folder, model_vocab, max(vocab.values(), default=-1) + 1)
    tokens, types = _token_table(vocab, added, n)

    def token_id(text: str | None) -> int | None:
        i = vocab.get(text) if text is not None else None
        return i if i is not None and i < n else None

    unk = token_id(_token_text(config.get("unk_token")) or model.get("unk_token"))
    merges = _merge_pairs(model)
    norm = _flatten(spec.get("normalizer") or {}, "normalizers")
    pre = _flatten(spec.get("pre_tokenizer") or {}, "pretokenizers")
    if model.get("byte_fallback"):
        _mark_spm_types(tokens, types, vocab, unk)
        add_prefix = _space_prefix(norm, pre, model_vocab)
        if any(s.get("type") == "Replace" for s in norm):  # HF finds these in text whose spaces are '▁' already
            for i, t in added.items():
                if i < n and not t.special and t.normalized:
                    tokens[i] = t.content.replace("▁", " ")
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(_spm_scores(tokens, merges))
        w.add_add_space_prefix(add_prefix)
    else:
        if any(s.get("type") != "NFC" for s in norm):
            raise UnsupportedError(f"normalizer {_describe(spec['normalizer'])} has no llama.cpp equivalent")
        pre_name = _pre_name(pre, bool(model.get("ignore_merges")))
        if any(" " in a or " " in b for a, b in merges):
            raise UnsupportedError("a merge has a token with a space, which GGUF's 'a b' merges cannot hold")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_name)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges([f"{a} {b}" for a, b in merges])

    for add, value in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id), (w.add_unk_token_id, unk),
                       (w.add_pad_token_id, token_id(_token_text(config.get("pad_token"))))):
        if value is not None and value < n:
            add(value)
    w.add_add_bos_token(tok.add_bos and tok.bos_id is not None and tok.bos_id < n)
    w.add_add_eos_token(_add_eos(hf, config, tok.eos_id))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _bpe_model(spec: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json's model, refused unless it is a BPE llama.cpp can run."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"tokenizer model {model.get('type')!r} is not supported for GGUF (only BPE)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UnsupportedError(f"BPE with {key}={model[key]!r} has no llama.cpp equivalent")
    return model


def _token_table(vocab: dict[str, int], added: dict[int, Any], n: int) -> tuple[list[str], list[int]]:
    """Every id's text and GGUF token type; ids the vocabulary leaves free are unused [PADi] entries."""
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for text, i in vocab.items():
        if i < n:  # added tokens beyond the embedding cannot be used by the model: left out
            tokens[i], types[i] = text, NORMAL
    for i, t in added.items():
        if i < n:
            types[i] = CONTROL if t.special else USER_DEFINED
    return tokens, types


def _mark_spm_types(tokens: list[str], types: list[int], vocab: dict[str, int], unk: int | None) -> None:
    """Byte-fallback BPE as SentencePiece: the 256 <0xNN> tokens become BYTE, the unknown token UNKNOWN."""
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise UnsupportedError(f"byte-fallback BPE without the byte token(s) {', '.join(missing[:4])}: llama.cpp "
                               "needs all 256")
    for i, text in enumerate(tokens):
        if types[i] == NORMAL and len(text) == 6 and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types[i] = BYTE
    if unk is not None:
        types[unk] = UNKNOWN
