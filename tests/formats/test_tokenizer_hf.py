"""HFTokenizer against transformers' AutoTokenizer on tiny trained tokenizers (byte-level and SentencePiece-style)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from helpers.tiny_tokenizer import CHATML, SPECIALS, write_tiny_tokenizer

from leanlm.errors import LeanLMError
from leanlm.formats.tokenizer import StreamDecoder
from leanlm.formats.tokenizer_hf import HFTokenizer

transformers = pytest.importorskip("transformers")

KINDS = ["bytelevel", "sentencepiece"]
TEXTS = [
    "Hello world",
    "  two  spaces\n\n\tTab\t\tx   ",
    "trailing spaces   \n   \n",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "Café naïve façade — ñandú, Ωμέγα, Straße",
    "你好，世界！漢字とカタカナのテスト。안녕",
    "emoji 😀👍🏽👨‍👩‍👧 🦀🫠 ❤️",
    "<|im_start|>user\nhi<|im_end|>\n<s>x</s> <unk>",
    " leading space",
    "",
    "\n",
    "a<|im_end|>b",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi 😀, what is 你好?"},
    {"role": "assistant", "content": "Hello!\n\nIt means hello."},
    {"role": "user", "content": "  thanks\t"},
]


@pytest.fixture(scope="module", params=KINDS)
def pair(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, HFTokenizer, Any]:
    folder = tmp_path_factory.mktemp(request.param)
    write_tiny_tokenizer(folder, request.param)
    return request.param, HFTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)


def _update_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair: tuple[str, HFTokenizer, Any], text: str) -> None:
    _, tok, ref = pair
    assert tok.encode(text, add_bos=False, special=True) == ref(text, add_special_tokens=False).input_ids
    plain = ref(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert tok.encode(text, add_bos=False) == plain
    assert tok.encode(text, special=True) == ref(text).input_ids  # BOS exactly when transformers adds it
    assert all(0 <= i < tok.vocab_size for i in tok.encode(text, special=True))


def test_special_token_text(pair: tuple[str, HFTokenizer, Any]) -> None:
    _, tok, _ = pair
    im_end = SPECIALS.index("<|im_end|>")
    assert tok.encode("<|im_end|>", add_bos=False, special=True) == [im_end]
    plain = tok.encode("<|im_end|>", add_bos=False)
    assert im_end not in plain and len(plain) > 1
    assert tok.decode(plain) == "<|im_end|>"
    assert all(tok.is_special(i) for i in range(len(SPECIALS)))
    assert not any(tok.is_special(i) for i in plain)


def test_bos(pair: tuple[str, HFTokenizer, Any]) -> None:
    kind, tok, ref = pair
    assert tok.bos_id == SPECIALS.index("<s>")
    assert tok.add_bos is (kind == "sentencepiece")  # from the post-processor: only the Llama-style one adds <s>
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode("hi", add_bos=False) == ref("hi", add_special_tokens=False).input_ids
    assert tok.encode("") == ref("").input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(pair: tuple[str, HFTokenizer, Any], text: str) -> None:
    _, tok, ref = pair
    ids = tok.encode(text, special=True)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False)


def test_decode_random_ids(pair: tuple[str, HFTokenizer, Any]) -> None:
    _, tok, ref = pair
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False)
    # ids past the tokenizer (padded embedding rows of a model) decode to nothing
    assert tok.decode([tok.vocab_size + 3]) == "" and tok.token_bytes(tok.vocab_size + 3) == b""


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()])
def test_stream_decoder(pair: tuple[str, HFTokenizer, Any], text: str) -> None:
    kind, tok, _ = pair
    ids = tok.encode(text, special=True)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    joined = "".join(pieces)
    if kind == "sentencepiece":
        # the decoder strips the prefix space of the very first token; a stream continuing a prompt keeps it
        joined = joined.removeprefix(" ")
    assert joined == tok.decode(ids)


def test_token_bytes(pair: tuple[str, HFTokenizer, Any]) -> None:
    kind, tok, ref = pair
    vocab = ref.get_vocab()
    if kind == "bytelevel":
        assert tok.token_bytes(vocab["Ġ"]) == b" "
        assert tok.token_bytes(vocab["Ċ"]) == b"\n"
        assert tok.token_bytes(vocab["ð"]) == b"\xf0"
    else:
        assert tok.token_bytes(vocab["▁"]) == b" "
        assert tok.token_bytes(vocab["<0xF0>"]) == b"\xf0"
        assert tok.token_bytes(vocab["<0x0A>"]) == b"\n"
        crab = tok.encode("🦀", add_bos=False)  # not in the training text: byte fallback
        assert b"".join(map(tok.token_bytes, crab)) == " 🦀".encode()
    assert tok.token_bytes(SPECIALS.index("<|im_end|>")) == b"<|im_end|>"
    with pytest.raises(LeanLMError):
        tok.token_bytes(-1)


def test_chat_template_matches_transformers(pair: tuple[str, HFTokenizer, Any]) -> None:
    _, tok, ref = pair
    assert tok.chat_template == CHATML
    for gen in (True, False):
        expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        text = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert text == expected
        assert tok.encode(text, add_bos=False, special=True) == ref(expected, add_special_tokens=False).input_ids


def test_chat_template_bos_once(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, "sentencepiece", chat_template="{{ bos_token }}" + CHATML)
    tok = HFTokenizer.from_folder(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    text = tok.apply_chat_template(MESSAGES)
    assert expected == "<s>" + text  # the leading BOS text is left to encode()
    ids = tok.encode(text, special=True)
    assert ids == ref(expected, add_special_tokens=False).input_ids and ids.count(tok.bos_id) == 1


def test_chat_template_sources(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, "bytelevel", chat_template=None)
    tok = HFTokenizer.from_folder(tmp_path)
    assert tok.chat_template is None
    assert tok.apply_chat_template(MESSAGES[:2]).endswith("<|im_start|>assistant\n")  # built-in ChatML
    listed = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "X{{ eos_token }}"}]
    _update_json(tmp_path / "tokenizer_config.json", chat_template=listed)
    assert HFTokenizer.from_folder(tmp_path).apply_chat_template(MESSAGES) == "X<|im_end|>"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    tok = HFTokenizer.from_folder(tmp_path)
    assert tok.apply_chat_template(MESSAGES) == "J4"
    assert tok.apply_chat_template(MESSAGES) == transformers.AutoTokenizer.from_pretrained(
        tmp_path).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_eos_ids_and_configs(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, "sentencepiece")
    _update_json(tmp_path / "config.json", architectures=["LlamaForCausalLM"], model_type="llama",
                 eos_token_id=9, bos_token_id=1)
    tok = HFTokenizer.from_folder(tmp_path)
    assert tok.architecture == "LlamaForCausalLM"
    assert tok.eos_id == 2 and tok.eos_ids == {2, 4, 9}  # </s>, <|im_end|> (end of turn), config's id
    _update_json(tmp_path / "generation_config.json", eos_token_id=[2, 7, 4000])
    tok = HFTokenizer.from_folder(tmp_path)
    assert tok.eos_ids == {2, 4, 7}  # generation_config wins over config.json; 4000 is not a token
    _update_json(tmp_path / "generation_config.json", eos_token_id=11)
    assert HFTokenizer.from_folder(tmp_path).eos_ids == {2, 4, 11}
    # bos/eos as AddedToken dicts, add_bos_token given explicitly
    _update_json(tmp_path / "tokenizer_config.json", bos_token={"content": "<s>", "special": True},
                 eos_token={"content": "<|im_end|>"}, add_bos_token=False)
    tok = HFTokenizer.from_folder(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 4, False)
    assert tok.encode("hi")[0] != 1


def test_missing_or_invalid_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(LeanLMError, match="no tokenizer.json") as err:
        HFTokenizer.from_folder(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(LeanLMError, match="not a valid tokenizer.json") as err:
        HFTokenizer.from_folder(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "tokenizer.json").write_text("{truncated")
    with pytest.raises(LeanLMError, match="not a valid tokenizer.json"):
        HFTokenizer.from_folder(tmp_path)


def test_vocab_fits_tiny_models(pair: tuple[str, HFTokenizer, Any]) -> None:
    _, tok, ref = pair
    assert tok.vocab_size <= 512 and len(ref) <= 512
