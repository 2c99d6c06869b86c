"""Tokenizer parity with llama.cpp (recorded fixtures), decoding, streaming and chat templates."""

from __future__ import annotations

import json
import os
import time
from functools import cache
from pathlib import Path

import pytest
from helpers import FIXTURES

from leanlm.errors import LeanLMError, UnsupportedError
from leanlm.formats.chat_template import render_chat_template
from leanlm.formats.gguf_file import GGUFFile
from leanlm.formats.tokenizer import StreamDecoder, Tokenizer

MODELS = {"smol": ("smollm2-135m", "LEANLM_TEST_SMOL"), "gemma": ("gemma3-270m", "LEANLM_TEST_GEMMA")}


def _model_path(name: str) -> Path:
    """The real model's file: $LEANLM_TEST_SMOL / $LEANLM_TEST_GEMMA, or pulled into the leanlm cache once (as
    conftest.py's fixtures do)."""
    from leanlm.formats.hub import pull

    reg, env = MODELS[name]
    return Path(os.environ[env]) if os.environ.get(env) else pull(reg, progress=False)


@cache
def _metadata(name: str) -> dict:
    return GGUFFile(_model_path(name)).metadata


@cache
def _tok(name: str) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(_metadata(name))


@cache
def _recorded(name: str) -> dict:
    return json.loads((FIXTURES / f"tokens_{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(params=["smol", "gemma"])
def name(request: pytest.FixtureRequest, smol_path: Path, gemma_path: Path) -> str:
    """Both real models (conftest's fixtures, which also mark these tests real_model)."""
    return request.param


@pytest.mark.parametrize("special", [False, True])
def test_ids_match_llamacpp(name: str, special: bool) -> None:
    tok, key = _tok(name), "ids_special" if special else "ids"
    wrong = [(c["text"], tok.encode(c["text"], add_bos=False, special=special), c[key])
             for c in _recorded(name)["cases"] if tok.encode(c["text"], add_bos=False, special=special) != c[key]]
    assert not wrong, f"{len(wrong)} strings differ from llama.cpp, first: {wrong[0]!r}"


def test_bos_eos_settings_match_llamacpp(name: str) -> None:
    tok, rec = _tok(name), _recorded(name)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (
        rec["bos_id"], rec["eos_id"], rec["add_bos"], rec["n_vocab"])
    for case in rec["with_bos"]:
        assert tok.encode(case["text"], special=True) == case["ids"]
    assert tok.encode("Hello", add_bos=True)[0] == tok.bos_id
    assert tok.encode("Hello", add_bos=False)[:1] != [tok.bos_id]


def test_token_bytes_match_llamacpp(name: str) -> None:
    tok = _tok(name)
    wrong = {k: v for k, v in _recorded(name)["pieces"].items() if tok.token_bytes(int(k)).hex() != v}
    assert not wrong


def test_eos_ids(name: str) -> None:
    tok = _tok(name)
    assert tok.eos_id in tok.eos_ids
    assert tok.eos_ids <= set(_recorded(name)["eog_ids"])  # llama.cpp also stops on a few more
    end_of_turn = {"smol": "<|im_end|>", "gemma": "<end_of_turn>"}[name]
    assert tok.encode(end_of_turn, add_bos=False, special=True)[0] in tok.eos_ids


def test_decode_roundtrip(name: str) -> None:
    tok = _tok(name)
    single_bytes = {p[0] for p in map(tok.token_bytes, range(tok.vocab_size)) if len(p) == 1}
    for case in _recorded(name)["cases"]:
        text = case["text"]
        if name == "gemma" and "▁" in text:
            continue  # SentencePiece writes spaces as ▁, so a literal ▁ decodes as a space
        if not set(text.encode()) <= single_bytes:
            continue  # SmolLM has no token for some bytes (0x04, 0xF1, ...): llama.cpp drops them too
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(case["ids"]) == text


def test_decode_special_tokens(name: str) -> None:
    tok = _tok(name)
    text = {"smol": "<|im_start|>user\nhi<|im_end|>", "gemma": "<start_of_turn>user\nhi<end_of_turn>"}[name]
    ids = tok.encode(text, special=True)
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special=False).endswith(text)


STREAM_TEXTS = ["emoji 😀👍🏽🎉 family 👨\u200d👩\u200d👧\u200d👦 ok", "你好，世界！こんにちは 안녕하세요",
                "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \U0001fae0 Ångström"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder(name: str, text: str) -> None:
    tok = _tok(name)
    ids = tok.encode(text, add_bos=True)
    stream = StreamDecoder(tok)
    parts = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) + stream.flush() == tok.decode(ids) == text


def test_stream_decoder_flushes_broken_bytes(name: str) -> None:
    tok = _tok(name)
    first_byte_of_emoji = tok.encode("😀", add_bos=False)[0]  # a byte-level / byte-fallback piece
    stream = StreamDecoder(tok)
    if len(tok.token_bytes(first_byte_of_emoji)) < 4:
        assert stream.push(first_byte_of_emoji) == ""
        assert stream.flush() == "\ufffd"


def test_build_is_fast(name: str) -> None:
    md = _metadata(name)
    start = time.perf_counter()
    Tokenizer.from_gguf_metadata(md)
    assert time.perf_counter() - start < 5.0  # ~0.25 s on one core; generous for loaded CI machines


SMOL_RENDERED = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                 "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]


def test_smol_chat_template(smol_path: Path) -> None:
    tok = _tok("smol")
    assert tok.chat_template is not None
    assert tok.apply_chat_template(CONVERSATION) == SMOL_RENDERED
    no_prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert no_prompt == SMOL_RENDERED.removesuffix("<|im_start|>assistant\n")
    ids = tok.encode(SMOL_RENDERED, special=True)
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4  # <|im_start|>, <|im_end|> as single ids


def test_smol_chat_template_matches_transformers(smol_path: Path) -> None:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tok = _tok("smol")
    for conv in (CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        for gen in (True, False):
            rendered, _ = utils.render_jinja_template(conversations=[conv], chat_template=tok.chat_template,
                                                      add_generation_prompt=gen, bos_token="<|im_start|>",
                                                      eos_token="<|im_end|>")
            assert tok.apply_chat_template(conv, add_generation_prompt=gen) == rendered[0]


def test_gemma_fallback_template(gemma_path: Path) -> None:
    tok = _tok("gemma")
    assert tok.chat_template is None
    conv = [{"role": "system", "content": "You are terse."}, *CONVERSATION]
    prompt = tok.apply_chat_template(conv)
    assert prompt == ("<start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
                      "<start_of_turn>model\nHello!<end_of_turn>\n"
                      "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode(prompt, special=True)
    assert ids[:4] == [2, 105, 2364, 107] and ids.count(2) == 1  # one BOS, then <start_of_turn>user\n
    assert tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": " hi "}]}],
                                   add_generation_prompt=False) == "<start_of_turn>user\nhi<end_of_turn>\n"
    with pytest.raises(LeanLMError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_file_template_bos_is_not_doubled(gemma_path: Path) -> None:
    md = dict(_metadata("gemma"), **{"tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"})
    tok = Tokenizer.from_gguf_metadata(md)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "hi" and tok.encode(prompt, special=True) == [2, 2202]


def test_chatml_fallback_and_helpers() -> None:
    msgs = [{"role": "user", "content": "héllo"}]
    assert render_chat_template(None, msgs, architecture="llama") == (
        "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n")
    out = render_chat_template("{% for m in messages %}{{ m | tojson }}{% break %}{% endfor %}"
                               "{% generation %}{{ strftime_now('%Y') | length }}{% endgeneration %}", msgs)
    assert out == '{"role": "user", "content": "héllo"}4'
    # trim_blocks / lstrip_blocks as in transformers
    assert render_chat_template("  {% if true %}\nA\n  {% endif %}\nB", msgs) == "A\nB"


@pytest.mark.parametrize("template, match", [
    ("{% if %}", "invalid"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "failed"),
    ("{{ undefined_thing.attr }}", "failed"),
])
def test_template_errors(template: str, match: str) -> None:
    with pytest.raises(LeanLMError, match=match):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def _spm_metadata(**extra: object) -> dict:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
              "▁", "a", "b", "c", "ab", "bc", "▁a", "▁ab", "abc", "<ctl>", "  "]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, 0.0, 0.0]
    types = [2, 3, 3, *[6] * 256, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 4]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, **extra}


def test_spm_synthetic() -> None:
    tok = Tokenizer.from_gguf_metadata(_spm_metadata())
    v = {t: i for i, t in enumerate(_spm_metadata()["tokenizer.ggml.tokens"])}
    assert tok.add_bos and tok.add_space_prefix and (tok.bos_id, tok.eos_id) == (1, 2)
    # "ab" (-5) beats "bc" (-6); then "▁a"+"b" -> "▁ab"; "c" stays
    assert tok.encode("abc", add_bos=False) == [v["▁ab"], v["c"]]
    assert tok.encode("bc", add_bos=False) == [v["▁"], v["bc"]]
    # user-defined "  " is cut out first; the text after it gets the space prefix; é falls back to bytes
    assert tok.encode("a  é", add_bos=False) == [v["▁a"], v["  "], v["▁"], 0xC3 + 3, 0xA9 + 3]
    assert tok.encode("<ctl>a", add_bos=False, special=True) == [v["<ctl>"], v["▁a"]]
    assert tok.decode(tok.encode("ab c é")) == "ab c é"
    no_prefix = Tokenizer.from_gguf_metadata(_spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert no_prefix.encode("abc", add_bos=False) == [v["abc"]]


def test_unsupported_tokenizers() -> None:
    with pytest.raises(UnsupportedError):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedError, match="pre-tokenizer"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nope",
                                      "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(LeanLMError):
        Tokenizer.from_gguf_metadata({})
