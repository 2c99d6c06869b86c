"""Build a tiny Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) for tests.

``write_tiny_tokenizer(folder, kind)`` trains a small BPE with the `tokenizers` trainer on the
built-in text below (well under a second) and writes files that
``transformers.AutoTokenizer.from_pretrained(folder)`` loads:

* ``kind="bytelevel"``: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer and decoder), no BOS added.
* ``kind="sentencepiece"``: Llama/Mistral style: Metaspace ``▁`` pre-tokenizer (prefix space on the
  first word), BPE with ``<0xNN>`` byte fallback, a decoder that strips the prefix space, and a
  post-processor that puts ``<s>`` in front.

Ids 0-4 are ``<unk> <s> </s> <|im_start|> <|im_end|>`` (special added tokens); every id is below `vocab_size`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

TEXT = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.
Once upon a time there was a little model that wanted to learn how to speak. It read every book
in the library, one token at a time, and it learned that the best answers are short and true.
Hello, world! How are you today? I am fine, thank you. What is the weather like in the city?
It is sunny and warm, with a light breeze from the west. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.

def greet(name: str) -> str:
    \"\"\"Return a friendly greeting.\"\"\"
    if not name:
        return "Hello, stranger!"
    return f"Hello, {name}!"

for i in range(10):
\tprint(i, i * i)  # squares
class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def norm(self) -> float:
        return (self.x ** 2 + self.y ** 2) ** 0.5

int main(void) { printf("hi\\n"); return 0; }
{"key": "value", "list": [1, 2, 3], "nested": {"ok": true}}

Café, naïve, résumé, façade, jalapeño, Straße, smørrebrød, crème brûlée.
Привет, как дела? Всё хорошо. Γειά σου κόσμε.
你好，世界！今天天气很好。我们去公园吧。
こんにちは世界。日本語のテキストです。
안녕하세요 세계
Emoji: 😀 😂 👍 🎉 🚀 ❤️ 🌍
"""


def _train_texts() -> list[str]:
    lines = [ln for ln in TEXT.splitlines(keepends=True) if ln.strip()]
    return lines * 3


def _bytelevel(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_train_texts(), trainer=trainer)
    return tok


def _sentencepiece(vocab_size: int) -> Tokenizer:
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + byte_tokens, show_progress=False,
                                  limit_alphabet=120)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    draft.train_from_iterator(_train_texts(), trainer=trainer)
    # rebuild without the byte tokens as added tokens: they are plain vocabulary entries used for byte fallback
    model = json.loads(draft.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=model["vocab"], merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def write_tiny_tokenizer(folder: Path, kind: str = "bytelevel", vocab_size: int = 512,
                         chat_template: str | None = CHATML) -> None:
    """Train a tiny tokenizer of `kind` ("bytelevel" or "sentencepiece") and write it into `folder`."""
    if kind == "bytelevel":
        tok, bos, eos = _bytelevel(vocab_size), "<s>", "<|im_end|>"
    elif kind == "sentencepiece":
        if vocab_size < len(SPECIALS) + 256 + 130:
            raise ValueError(f"vocab_size {vocab_size} is too small for a byte-fallback tokenizer")
        tok, bos, eos = _sentencepiece(vocab_size), "<s>", "</s>"
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (bytelevel or sentencepiece)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    vocab = tok.get_vocab(with_added_tokens=True)
    assert [vocab[t] for t in SPECIALS] == list(range(len(SPECIALS)))
    assert max(vocab.values()) < vocab_size, f"tiny tokenizer has {max(vocab.values()) + 1} ids > {vocab_size}"

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
