"""The CLI: streams only the answer to stdout; bad input gives one line on stderr and exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from helpers import FIXTURES

import leanlm
from leanlm.tools.cli import main


@pytest.fixture(scope="module")
def smol(smol_path: Path) -> leanlm.LLM:
    return leanlm.load(smol_path, dtype="float32")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_greedy_streams_exactly_the_api_answer(smol_path: Path, smol: leanlm.LLM,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "Name a color."
    code, out, err = run_cli(["run", str(smol_path), prompt, "--temperature", "0", "--max-tokens", "24",
                              "--dtype", "float32"], capsys)
    assert code == 0
    want = "".join(smol.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=24))
    assert out == want + "\n"
    assert "tok/s" in err and "tok/s" not in out
    code, chunked, _ = run_cli(["run", str(smol_path), prompt, "--temperature", "0", "--max-tokens", "24",
                                "--dtype", "float32", "--prefill-chunk", "5"], capsys)
    assert code == 0 and chunked == out  # a prompt prefilled 5 tokens at a time gives the same answer


def test_raw_prompt_and_stop_string(smol_path: Path, smol: leanlm.LLM, capsys: pytest.CaptureFixture[str]) -> None:
    full = "".join(smol.generate("1, 2, 3, 4,", temperature=0, max_tokens=16))
    assert " 6," in full
    code, out, _ = run_cli(["run", str(smol_path), "1, 2, 3, 4,", "--raw", "--temperature", "0",
                            "--max-tokens", "16", "--stop", " 6,", "--dtype", "float32"], capsys)
    assert code == 0 and out == full[:full.index(" 6,")] + "\n"


def test_same_seed_same_text(smol: leanlm.LLM) -> None:
    msgs = [{"role": "user", "content": "Tell me a story."}]
    a = "".join(smol.chat(msgs, temperature=1.0, max_tokens=20, seed=42))
    b = "".join(smol.chat(msgs, temperature=1.0, max_tokens=20, seed=42))
    c = "".join(smol.chat(msgs, temperature=1.0, max_tokens=20, seed=43))
    assert a == b and a != c


def test_tokenize_prints_json_ids_without_bos(smol_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["tokenize", str(smol_path), "<|im_start|>hi", "--special"], capsys)
    ids = json.loads(out)
    assert code == 0 and ids[0] == 1 and len(ids) == 2  # <|im_start|> is id 1 in SmolLM2
    code, out, _ = run_cli(["tokenize", str(smol_path), "<|im_start|>hi"], capsys)
    assert len(json.loads(out)) > 2


def _expect_error(args: list[str], capsys: pytest.CaptureFixture[str], words: str) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_int8_kv_cache_runs_and_refuses_where_it_cannot(smol_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--kv-cache int8` generates where our kernels run (bf16 on AVX-512 VNNI) and is one clear line of
    error with float32 compute, whose attention runs in PyTorch."""
    from leanlm.kernels.plan import KernelPlan

    _expect_error(["run", str(smol_path), "hi", "--kv-cache", "int8", "--dtype", "float32"], capsys, "--kv-cache int8")
    if KernelPlan.resolve().int8_kv:
        code, out, _ = run_cli(["run", str(smol_path), "Name a color.", "--kv-cache", "int8", "--temperature", "0",
                                "--max-tokens", "8"], capsys)
        assert code == 0 and out.strip()


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _expect_error(["run", str(tmp_path / "nope.gguf"), "hi"], capsys, "nope.gguf")


def test_not_a_gguf_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"hello world, not a model" * 10)
    _expect_error(["run", str(bad), "hi"], capsys, "not a GGUF file")


def test_truncated_gguf(smol_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smol_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(5_000_000))
    _expect_error(["run", str(cut), "hi"], capsys, "truncated")


def _tiny_gguf(path: Path, arch: str, qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_context_length(32)
    w.add_layer_norm_rms_eps(1e-5)
    data = np.zeros((4, 8), np.float32)
    if qtype == GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", data)
    else:  # raw bytes of a type we do not support
        w.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "mamba.gguf"
    _tiny_gguf(p, "mamba")
    _expect_error(["run", str(p), "hi"], capsys, "architecture 'mamba'")


def test_unsupported_tensor_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "iq.gguf"
    _tiny_gguf(p, "llama", GGMLQuantizationType.IQ2_XXS)
    _expect_error(["run", str(p), "hi"], capsys, "IQ2_XXS")


def test_prompt_longer_than_context(smol_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _expect_error(["run", str(smol_path), "hello " * 9000, "--raw"], capsys, "context of 8192")


def test_bad_parameter(smol_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _expect_error(["run", str(smol_path), "hi", "--top-p", "0"], capsys, "top_p")


def test_unknown_model_name(capsys: pytest.CaptureFixture[str]) -> None:
    _expect_error(["run", "no-such-model", "hi"], capsys, "unknown model")


@pytest.mark.skipif(shutil.which("leanlm") is None, reason="console script not installed")
def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    r = subprocess.run(["leanlm", "run", str(tmp_path / "x.gguf"), "hi"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("leanlm: error:")
    r = subprocess.run([sys.executable, "-m", "leanlm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "tokenize" in r.stdout


def test_perplexity_json(smol_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = str(FIXTURES / "ppl_text.txt")
    code, out, _ = run_cli(["perplexity", str(smol_path), "--file", text, "--ctx", "128", "--chunks", "2",
                            "--json"], capsys)
    r = json.loads(out)
    assert code == 0 and r["n_chunks"] == 2 and r["n_tokens_scored"] == 2 * (128 - 1 - 64)
    assert 1.0 < r["perplexity"] < 100.0


def test_perplexity_missing_text_file(smol_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _expect_error(["perplexity", str(smol_path), "--file", str(tmp_path / "none.txt")], capsys, "none.txt")


def test_run_with_a_json_schema(smol_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "rank": {"type": "integer"}}, "required": ["city", "rank"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    code, out, _ = run_cli(["run", str(smol_path), "Name the largest city in Japan.", "--json-schema", str(path),
                            "--temperature", "0", "--max-tokens", "60"], capsys)
    value = json.loads(out)
    assert code == 0 and set(value) == {"city", "rank"} and isinstance(value["rank"], int)
    path.write_text(json.dumps({"type": "string", "pattern": "^x"}))
    _expect_error(["run", str(smol_path), "hi", "--json-schema", str(path)], capsys, "'pattern' at # is not supported")
    _expect_error(["run", str(smol_path), "hi", "--json-schema", str(tmp_path / "none.json")], capsys,
                  "cannot read the JSON Schema")
