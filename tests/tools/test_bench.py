"""`leanlm bench`: JSON report shape and sanity, batched greedy decode == single-sequence decode, plot, errors.

No timing assertions: speeds are only checked to be positive numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import leanlm
from leanlm.runtime.generate import generate_ids
from leanlm.tools import bench, bench_engines, bench_report
from leanlm.tools.bench_engines import gguf_weight_bytes
from leanlm.tools.cli import main

ENGINE_KEYS = {"engine", "version", "threads", "dtype", "load_s", "weight_bytes", "weight_bytes_per_step",
               "base_rss_mib", "peak_rss_mib", "rss_above_imports_mib", "runs"}
RUN_KEYS = {"batch", "prompt_tokens", "gen_tokens", "total_gen_tokens", "ttft_s", "prefill_tps", "decode_s",
            "decode_tps", "peak_rss_mib", "weight_gbps", "usd_per_mtok", "same_tokens_as_smallest_batch",
            "decode_tps_reps"}
COMPARE = bench.has_llamacpp()


@pytest.fixture(scope="module")
def report(smol_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One tiny CLI run (with llama.cpp when it is installed): its JSON and the plot file."""
    png = tmp_path_factory.mktemp("bench") / "decode.png"
    args = ["bench", str(smol_path), "--prompt-tokens", "16", "--gen-tokens", "4", "--batch", "2,1",
            "--threads", "1", "--json", "--plot", str(png), "--price-per-hour", "2.5", "--compile", "off"]
    code, out, err = _run(args + (["--compare", "llama.cpp"] if COMPARE else []))
    assert code == 0, err
    return json.loads(out), png


def _run(args: list[str]) -> tuple[int, str, str]:
    """`leanlm ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_json_report_has_every_number(report: tuple[dict[str, Any], Path]) -> None:
    out, _ = report
    engines = ["leanlm", "llamacpp"] if COMPARE else ["leanlm"]
    assert out["batches"] == [1, 2] and out["prompt_tokens"] == 16 and out["gen_tokens"] == 4
    for e in engines:
        r = out[e]
        assert ENGINE_KEYS <= set(r), set(r) ^ ENGINE_KEYS
        assert r["load_s"] > 0 and r["peak_rss_mib"] >= r["base_rss_mib"] > 0
        assert 0 < r["weight_bytes_per_step"] <= r["weight_bytes"]
        assert [run["batch"] for run in r["runs"]] == [1, 2]
        for run in r["runs"]:
            assert set(run) == RUN_KEYS and "ids" not in run
            b = run["batch"]
            assert run["prompt_tokens"] == 16 and run["gen_tokens"] == 4 and run["total_gen_tokens"] == 4 * b
            assert run["ttft_s"] > 0 and run["decode_s"] > 0
            assert run["decode_tps"] == pytest.approx(b * 3 / run["decode_s"])  # B x (gen - 1) / decode seconds
            assert run["prefill_tps"] == pytest.approx(b * 16 / run["ttft_s"])
            assert run["weight_gbps"] == pytest.approx(run["decode_tps"] / b * r["weight_bytes_per_step"] / 1e9)
            assert run["usd_per_mtok"] == pytest.approx(2.5 / (run["decode_tps"] * 3600) * 1e6)
            assert run["same_tokens_as_smallest_batch"] == 4  # every batched sequence repeats batch 1's tokens
    if COMPARE:
        ratios = out["ratios_leanlm_over_llamacpp"]
        assert ratios["load_s"] == pytest.approx(out["leanlm"]["load_s"] / out["llamacpp"]["load_s"])
        by = ratios["by_batch"]["2"]
        assert by["decode_tps"] == pytest.approx(out["leanlm"]["runs"][1]["decode_tps"]
                                                 / out["llamacpp"]["runs"][1]["decode_tps"])
        assert set(by) == {"ttft_s", "prefill_tps", "decode_tps", "weight_gbps", "usd_per_mtok"}
        assert 0 <= out["identical_leading_tokens"] <= 4


def test_plot_is_a_png(report: tuple[dict[str, Any], Path]) -> None:
    _, png = report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_prints_every_batch(report: tuple[dict[str, Any], Path], capsys: pytest.CaptureFixture[str]) -> None:
    bench_report.print_table(json.loads(json.dumps(report[0])))
    text = capsys.readouterr().out
    assert "batch 1   decode tok/s" in text and "batch 2   time to first token (s)" in text
    assert ("leanlm/llama.cpp" in text) == COMPARE


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for this test (two OpenMP threads on a shared 2-core machine crawl), then restored."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_batched_greedy_decode_matches_single_sequence(smol_path: Path, one_thread: None) -> None:
    llm = leanlm.load(smol_path, progress=False)  # dtype auto: bf16 with int4/int8 kernels, as benchmarked
    prompt = bench.prompt_ids(smol_path, 21)
    greedy = lambda logits, hist: logits.float().argmax(-1)
    want = list(generate_ids(llm.model, prompt, greedy, 6, chunk=8))
    for b in (1, 3):
        ids, ttft, decode_s = bench_engines.greedy_batch(llm.model, prompt, b, 6, chunk=8)  # chunked prefill too
        assert ids == [want] * b and ttft > 0 and decode_s > 0
    total, per_step = bench_engines.weight_bytes(llm.model)
    assert per_step == total  # SmolLM2 ties its embedding to the head: the table is read every step


def test_gguf_weight_bytes(smol_path: Path) -> None:
    from leanlm.formats.gguf_file import GGUFFile

    f = GGUFFile(smol_path)
    total = sum(t.nbytes for t in f.tensors.values())
    assert "output.weight" not in f.tensors  # tied: nothing is skipped
    assert gguf_weight_bytes(str(smol_path)) == {"weight_bytes": total, "weight_bytes_per_step": total}


@pytest.mark.parametrize("args, words", [
    (["--batch", "0"], "--batch"),
    (["--batch", "1,x"], "--batch"),
    (["--gen-tokens", "0"], "--gen-tokens"),
    (["--prompt-tokens", "-3"], "--prompt-tokens"),
    (["--threads", "0"], "--threads"),
    (["--price-per-hour", "-1"], "--price-per-hour"),
    (["--compare", "vllm"], "vllm"),
    (["--plot", "/nonexistent-dir/x.png"], "nonexistent-dir"),
])
def test_bad_arguments_give_one_line_errors(smol_path: Path, args: list[str], words: str) -> None:
    code, out, err = _run(["bench", str(smol_path), *args])
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("leanlm: error:") and words in err, err


def test_missing_model_and_missing_llamacpp(smol_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = _run(["bench", str(tmp_path / "nope.gguf")])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "nope.gguf" in err
    monkeypatch.setattr(bench, "has_llamacpp", lambda: False)
    code, out, err = _run(["bench", str(smol_path), "--compare", "llama.cpp"])
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "llama-cpp-python" in err


def test_compare_needs_a_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "has_llamacpp", lambda: True)
    code, _, err = _run(["bench", str(tmp_path), "--compare", "llama.cpp"])  # a folder (HF checkpoint)
    assert code == 1 and len(err.strip().splitlines()) == 1 and ".gguf" in err


def test_default_model_is_the_registry_default() -> None:
    from leanlm.formats.catalog import DEFAULT_MODEL
    from leanlm.tools.cli import build_parser

    a = build_parser().parse_args(["bench"])
    assert a.model == DEFAULT_MODEL and a.batch == "1" and a.prompt_tokens == 256 and a.gen_tokens == 128


def test_repeats_report_the_median_run() -> None:
    """--repeat N: per batch size the run with the median decode speed, whole (its numbers agree), all speeds
    kept; engine-level numbers are medians."""
    def rep(load: float, tps: list[float]) -> dict[str, Any]:
        return {"engine": "leanlm", "load_s": load, "peak_rss_mib": 100 * load,
                "runs": [{"batch": b, "decode_tps": t, "decode_s": b / t, "ids": [[1, 2]]}
                         for b, t in zip((1, 8), tps)]}

    merged = bench.merge_repeats([rep(0.5, [10.0, 80.0]), rep(0.9, [30.0, 40.0]), rep(0.7, [20.0, 60.0])])
    assert merged["load_s"] == 0.7 and merged["peak_rss_mib"] == 70 and merged["repeats"] == 3
    one, eight = merged["runs"]
    assert one["decode_tps"] == 20.0 and one["decode_s"] == 1 / 20.0 and one["decode_tps_reps"] == [10.0, 30.0, 20.0]
    assert eight["decode_tps"] == 60.0 and eight["decode_s"] == 8 / 60.0
    assert bench.merge_repeats([rep(0.5, [10.0, 80.0])])["runs"][0]["decode_tps"] == 10.0


def test_a_llamacpp_crash_on_an_amx_cpu_says_how_to_rebuild() -> None:
    """llama-cpp-python's default build dies in its AMX matmul on AMX CPUs: the one-line error says what to do;
    a leanlm failure, an ordinary exit code or a CPU without AMX get no such hint."""
    from leanlm.tools.bench import _crash_hint

    amx = " amx_int8" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    assert ("GGML_AMX_INT8=OFF" in _crash_hint("llamacpp", -11)) == amx
    assert _crash_hint("leanlm", -11) == "" and _crash_hint("llamacpp", 1) == ""
