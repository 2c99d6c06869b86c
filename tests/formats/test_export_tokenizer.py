"""write_tokenizer: a HF folder's tokenizer as GGUF metadata gives the HF ids in leanlm and in llama.cpp.

Tiny tokenizers are trained with `tokenizers` (byte-level BPE under each pre-tokenizer llama.cpp names) or
derived from tests/tiny_tokenizer.py's SentencePiece-style BPE (three ways of turning spaces into ``▁``).
Each is written with a tiny random llama model, then ~55 texts are encoded with special-token parsing off
and on. Two differences GGUF cannot express are pinned down instead of skipped silently: Qwen2's NFC
normalizer (llama.cpp does not normalize) and Metaspace's prefix rule (llama.cpp adds a space to every text
fragment, which is what the legacy Prepend normalizer does).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FIXTURES
from helpers.tiny_tokenizer import CHATML, SPECIALS, TEXT, write_tiny_tokenizer  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from leanlm.errors import UnsupportedError
from leanlm.formats.gguf_file import GGUFFile
from leanlm.formats.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED
from leanlm.formats.gguf_writer import write_gguf
from leanlm.formats.tokenizer import Tokenizer as GGUFTokenizer
from leanlm.formats.tokenizer_export import write_tokenizer
from leanlm.model.config import ModelConfig
from leanlm.model.transformer import Transformer

USER_TOKENS = ["<think>", "</think>"]  # non-special added tokens: USER_DEFINED, always cut out
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
TEXTS = [
    "Hello world", "hello, world!", " leading space", "  two leading", "trailing space ", "multiple   spaces  inside",
    "tabs\tand\ttabs", "new\nline", "\n\nleading newlines", "windows\r\nline", "mixed \t\n whitespace", "   ", "a",
    "The quick brown fox jumps over the lazy dog.", "I'm you're we've they'll it's he'd", "IT'S SHOUTING I'LL",
    "numbers 0 12 123 1234 12345 3.14159", "2024-11-23 10:42:07", "phone: +1 (555) 010-9999", "١٢٣ arabic digits",
    "Ⅻ roman numeral", "Café naïve résumé", "Straße smørrebrød crème brûlée", "Привет, как дела?", "Γειά σου κόσμε",
    "你好，世界！", "こんにちは世界", "안녕하세요", "emoji 😀😂👍🎉🚀", "❤️ family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "def f(x):\n    return x ** 2\n", "if (a && b) { c++; }", "<html><body>hi</body></html>", '{"key": [1, 2, 3]}',
    "email@example.com https://example.org/path?q=1&r=2", "....!!!???", "$100 & 50% off ~ ^_^",
    "<|im_start|>user\nhi<|im_end|>", "<s>text</s>", "<unk> token", "<|im_start|><|im_end|>", "x<|im_end|>y",
    " <s> spaced </s> ", "nbsp\u00a0here", "ideographic\u3000space", "thin\u2009space", "zero\u200bwidth",
    "e\u0301 combining", "ﬁ ligature", "\u017fome long s it'\u017f", "apostrophe ’ curly", "camelCase snake_case",
    "  \n  \n", "end with newline\n", "<think>reason</think> answer", "x<think>",
]


def _bytelevel(pre: Any, ignore_merges: bool = False, normalizer: Any = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = TEXT * 3 + (FIXTURES / "calibration.txt").read_text()[:12000]
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def _spm(tmp: Path, normalizer: Any = None, pre: Any = "keep", spaces_token: bool = False) -> Tokenizer:
    """tiny_tokenizer's SentencePiece-style BPE (Metaspace, prepend_scheme first) with other space steps."""
    write_tiny_tokenizer(tmp, "sentencepiece", vocab_size=700)
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    if pre != "keep":
        tok.normalizer, tok.pre_tokenizer = normalizer, pre
    if spaces_token:  # like Gemma's whitespace tokens: found in the normalized text (spaces already '▁')
        tok.add_tokens([AddedToken("▁▁", special=False, normalized=True)])
    return tok


ByteLevel = pre_tokenizers.ByteLevel
SPACES = normalizers.Replace(" ", "▁")
# name -> (tokenizer builder, tokenizer.ggml.model, tokenizer.ggml.pre, config.json vocab_size padding)
VARIANTS: dict[str, tuple[Callable[[Path], Tokenizer], str, str | None, int]] = {
    "gpt2": (lambda _: _bytelevel(ByteLevel(add_prefix_space=False)), "gpt2", "gpt-2", 0),
    "llama3": (lambda _: _bytelevel(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), "isolated"),
                                                             ByteLevel(add_prefix_space=False, use_regex=False)]),
                                    ignore_merges=True), "gpt2", "llama3", 0),
    "dbrx": (lambda _: _bytelevel(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), "isolated"),
                                                           ByteLevel(add_prefix_space=False, use_regex=False)])),
             "gpt2", "dbrx", 0),
    "qwen2": (lambda _: _bytelevel(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), "isolated"),
                                                            ByteLevel(add_prefix_space=False, use_regex=False)]),
                                   normalizer=normalizers.NFC()), "gpt2", "qwen2", 7),
    "smollm": (lambda _: _bytelevel(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                             ByteLevel(add_prefix_space=False)])), "gpt2", "smollm", 0),
    "spm-legacy": (lambda d: _spm(d, normalizers.Sequence([normalizers.Prepend("▁"), SPACES]), None),
                   "llama", None, 0),
    "spm-gemma": (lambda d: _spm(d, SPACES, pre_tokenizers.Split(" ", "merged_with_previous"), spaces_token=True),
                  "llama", None, 0),
    "spm-metaspace": (lambda d: _spm(d), "llama", None, 0),
}


@dataclass
class Built:
    folder: Path
    gguf: Path
    hf: Tokenizer
    md: dict[str, Any]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    cache: dict[str, Built] = {}

    def make(name: str) -> Built:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            make_tok, kind, _, pad = VARIANTS[name]
            tok = make_tok(folder)
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_TOKENS])
            tok.save(str(folder / "tokenizer.json"))
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                      "eos_token": "<|im_end|>" if kind == "gpt2" else "</s>", "unk_token": "<unk>",
                      "pad_token": "<unk>", "chat_template": CHATML}
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
            n = tok.get_vocab_size(with_added_tokens=True) + pad
            if pad:
                (folder / "config.json").write_text(json.dumps({"vocab_size": n}))
            torch.manual_seed(0)
            cfg = ModelConfig(arch="llama", vocab_size=n, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                              hidden_dim=32, context_length=64)
            path = write_gguf(Transformer(cfg), folder / "tiny.gguf",
                              extra_metadata=lambda w: write_tokenizer(w, folder))
            hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
            cache[name] = Built(folder, path, hf, GGUFFile(path).metadata)
        return cache[name]

    return make


def hf_ids(hf: Tokenizer, text: str, special: bool, add_special: bool = False) -> list[int]:
    """HF ids; special=False treats special-token text as plain text (split_special_tokens)."""
    hf.encode_special_tokens = not special
    return hf.encode(text, add_special_tokens=add_special).ids


def known_difference(name: str, text: str, special: bool) -> bool:
    """Texts where llama.cpp cannot agree with HF (module docstring of leanlm.formats.tokenizer_export)."""
    if name == "qwen2":
        return unicodedata.normalize("NFC", text) != text
    if name == "spm-metaspace":  # HF prefixes only a first fragment not starting with a space; llama.cpp every one
        cut = USER_TOKENS + (SPECIALS if special else [])
        frags = re.split("|".join(map(re.escape, cut)), text)
        return frags[0].startswith(" ") or any(frags[1:])
    return False


def check_ids(name: str, b: Built, encode: Callable[[str, bool], list[int]]) -> int:
    checked = 0
    for special in (False, True):
        for text in TEXTS:
            if not known_difference(name, text, special):
                assert encode(text, special) == hf_ids(b.hf, text, special), (text, special)
                checked += 1
    return checked


@pytest.mark.parametrize("name", VARIANTS)
def test_metadata(name: str, build: Callable[[str], Built]) -> None:
    b = build(name)
    md, vocab = b.md, b.hf.get_vocab(with_added_tokens=True)
    _, kind, pre, pad = VARIANTS[name]
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert md["tokenizer.ggml.model"] == kind and md.get("tokenizer.ggml.pre") == pre
    assert len(tokens) == len(vocab) + pad and all(tokens[i] == t.replace("▁▁", "  ") for t, i in vocab.items())
    if pad:
        assert types[-pad:] == [UNUSED] * pad and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert [types[vocab[t]] for t in SPECIALS[1:]] == [CONTROL] * 4
    assert [types[vocab[t]] for t in USER_TOKENS] == [USER_DEFINED] * 2
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.eos_token_id"] == (4 if kind == "gpt2" else 2)
    assert md["tokenizer.ggml.unknown_token_id"] == md["tokenizer.ggml.padding_token_id"] == 0
    assert md["tokenizer.chat_template"] == CHATML and md["tokenizer.ggml.add_eos_token"] is False
    assert md["tokenizer.ggml.add_bos_token"] is (kind == "llama")  # tiny SPM's post-processor adds <s>
    merges = json.loads((b.folder / "tokenizer.json").read_text())["model"]["merges"]
    if kind == "gpt2":
        assert md["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
        assert types[vocab["<unk>"]] == CONTROL and types[vocab["Ġthe"]] == NORMAL
    else:
        assert md["tokenizer.ggml.add_space_prefix"] is (name != "spm-gemma")
        if name == "spm-gemma":
            assert tokens[vocab["▁▁"]] == "  " and types[vocab["▁▁"]] == USER_DEFINED
        assert types[vocab["<unk>"]] == UNKNOWN and types[vocab["<0x0A>"]] == BYTE and types[vocab["▁t"]] == NORMAL
        scores = md["tokenizer.ggml.scores"]
        assert [scores[vocab[a + b]] for a, b in merges[:3]] == [0.0, -1.0, -2.0]


@pytest.mark.parametrize("name", VARIANTS)
def test_leanlm_gguf_tokenizer_matches_hf(name: str, build: Callable[[str], Built]) -> None:
    b = build(name)
    ours = GGUFTokenizer.from_gguf_metadata(b.md)
    assert check_ids(name, b, lambda text, special: ours.encode(text, add_bos=False, special=special)) >= 90
    for text in ("Hello world", "x"):
        assert ours.encode(text) == hf_ids(b.hf, text, special=False, add_special=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_llama_cpp_matches_hf(name: str, build: Callable[[str], Built]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    b = build(name)
    llm = llama_cpp.Llama(model_path=str(b.gguf), vocab_only=True, verbose=False)
    assert check_ids(name, b, lambda text, special: llm.tokenize(text.encode(), add_bos=False, special=special)) >= 90
    for text in ("Hello world", "x"):
        assert llm.tokenize(text.encode(), add_bos=True) == hf_ids(b.hf, text, special=False, add_special=True)


def test_known_differences_are_the_documented_ones(build: Callable[[str], Built]) -> None:
    """NFC: llama.cpp gives HF's ids for the NFC form. Metaspace: llama.cpp gives the ids of the legacy
    Prepend normalizer (a "▁" in front of every fragment) on the same vocabulary."""
    ours = GGUFTokenizer.from_gguf_metadata(build("qwen2").md)
    qwen = build("qwen2").hf
    text = "e\u0301 combining"
    assert ours.encode(text, add_bos=False) != hf_ids(qwen, text, False)
    assert ours.encode(unicodedata.normalize("NFC", text), add_bos=False) == hf_ids(qwen, text, False)
    meta = build("spm-metaspace")
    ours = GGUFTokenizer.from_gguf_metadata(meta.md)
    legacy = Tokenizer.from_file(str(meta.folder / "tokenizer.json"))  # training is not deterministic: same file
    legacy.normalizer, legacy.pre_tokenizer = normalizers.Sequence([normalizers.Prepend("▁"), SPACES]), None
    differ = [(t, s) for s in (False, True) for t in TEXTS if known_difference("spm-metaspace", t, s)]
    assert len(differ) > 10
    for text, special in differ:
        assert ours.encode(text, add_bos=False, special=special) == hf_ids(legacy, text, special), (text, special)
    assert ours.encode(" leading space", add_bos=False)[1:] == hf_ids(meta.hf, " leading space", False)


TEKKEN_LIKE = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|\p{N}| ?[^\s\p{L}\p{N}]+"


@pytest.mark.parametrize("edit, message", [
    (lambda j: j.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": TEKKEN_LIKE}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}),
     f"`{TEKKEN_LIKE}`"),
    (lambda j: j["model"].update(ignore_merges=True), "ignore_merges=True"),
    (lambda j: j.update(normalizer={"type": "Lowercase"}), "Lowercase"),
    (lambda j: j["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda j: j.update(model={"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]],
                               "byte_fallback": False}), "Unigram"),
], ids=["unknown-regex", "ignore-merges", "normalizer", "prefix-space", "unigram"])
def test_unsupported_tokenizers_raise(build: Callable[[str], Built], tmp_path: Path, edit: Callable[[dict], Any],
                                      message: str) -> None:
    src = build("gpt2").folder
    spec = json.loads((src / "tokenizer.json").read_text())
    edit(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    import gguf

    with pytest.raises(UnsupportedError, match=re.escape(message)):
        write_tokenizer(gguf.GGUFWriter(None, "llama"), tmp_path)
