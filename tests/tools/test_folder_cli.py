"""`leanlm run`, `chat` and `tokenize` on a Hugging Face checkpoint folder, as on a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import leanlm
from leanlm.tools.cli import main

transformers = pytest.importorskip("transformers")
from helpers.tiny_models import write_tiny_mistral  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral"), tokenizer_kind="sentencepiece")


def test_run_on_folder_matches_transformers_greedy(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from leanlm.runtime.generate import generate_ids
    from leanlm.runtime.sampling import SamplingParams, sample

    code = main(["run", str(folder), "hello world", "--raw", "--temperature", "0", "--max-tokens", "20",
                 "--ignore-eos", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0
    llm = leanlm.load(folder, dtype="float32")
    assert out == "".join(llm.generate("hello world", temperature=0, max_tokens=20, ignore_eos=True)) + "\n"
    ids = llm.encode_prompt("hello world")
    assert ids[0] == llm.tokenizer.bos_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = SamplingParams(temperature=0)
    assert list(generate_ids(llm.model, ids, lambda lg, h: sample(lg, greedy, h), 20)) == ref[0, len(ids):].tolist()


def test_tokenize_folder_matches_transformers(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "hello  world\n\tdef f(x): return x  # ünïcödé 你好"
    assert main(["tokenize", str(folder), text]) == 0
    ids = json.loads(capsys.readouterr().out)
    ref = transformers.AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    assert ids == ref


def test_chat_on_folder_uses_its_template(folder: Path) -> None:
    llm = leanlm.load(folder)
    ids = llm.chat_prompt([{"role": "user", "content": "hi"}])
    text = llm.tokenizer.decode(ids, skip_special=False)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
