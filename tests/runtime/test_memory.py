"""The memory planner (memory.py): K/V bytes are exactly what the cache allocates, a budget gets the largest
batch that fits it, tied weights count once, and a real batched run grows the process by what was planned."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from helpers.tiny_models import random_transformer

from leanlm.errors import LeanLMError
from leanlm.model.cache import ModelCache
from leanlm.model.config import MlaConfig
from leanlm.runtime.memory import kv_bytes, parse_size, plan, weight_bytes

MODELS = {
    "swa": lambda: random_transformer((4, None, 4)),
    "bf16_blocked": lambda: random_transformer((None, 8), n_heads=4, n_kv_heads=2, head_dim=64, dim=64).bfloat16(),
    "mla": lambda: random_transformer((None,), n_kv_heads=4, head_dim=12, rope_dim=4, rope_interleaved=True,
                                      mla=MlaConfig(24, None, 8, 4, 6)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("batch", "ctx"), [(1, 7), (3, 100)])
def test_kv_bytes_are_what_the_cache_allocates(name: str, batch: int, ctx: int) -> None:
    m = MODELS[name]()
    assert kv_bytes(m, batch, ctx, 16) == ModelCache.for_model(m, batch, ctx, 16).nbytes()


def test_a_budget_gets_the_largest_batch_that_fits() -> None:
    m = MODELS["swa"]()
    for budget in (200_000, 1_000_000, 5_000_000):
        p = plan(m, 64, memory=budget, chunk=16)
        assert p.total <= budget < plan(m, 64, batch=p.batch + 1, chunk=16).total
    with pytest.raises(LeanLMError, match="more than"):
        plan(m, 64, memory=1000)


def test_tied_weights_count_once() -> None:
    m = random_transformer((None,), tie_embeddings=True)
    m.output.weight = m.tok_embeddings.weight
    assert weight_bytes(m) == sum(p.numel() * 4 for p in m.parameters())  # parameters() lists it once
    assert weight_bytes(m) < sum(t.numel() * 4 for t in m.state_dict().values())


def test_parse_size() -> None:
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("1.5k") == 1536
    assert parse_size("1000") == 1000 and parse_size("2 GB") == 2 * 2**30
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(LeanLMError):
            parse_size(bad)


def test_real_batch_grows_the_process_by_the_plan(smol_path) -> None:  # noqa: ANN001
    """SmolLM2, 4 sequences of ~2000 positions (K/V 177 MiB): the process's resident memory grows by at least
    80% of the planned cache and by no more than the plan's cache and activations (+16 MiB of allocator slack)."""
    import psutil

    import leanlm
    from leanlm.tools.bench_engines import greedy_batch

    llm = leanlm.load(str(smol_path), progress=False)
    step = llm.decode_step(4, "off")
    greedy_batch(llm.model, [1, 2, 3], 4, 3, step=step)  # the step's own first-call allocations
    proc, stop = psutil.Process(), threading.Event()
    base = peak = proc.memory_info().rss

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 400)[:2000]
    greedy_batch(llm.model, ids, 4, 16, step=step)
    stop.set()
    t.join()
    p = plan(llm.model, 2016, batch=4)
    grew = peak - base
    assert 0.8 * p.kv < grew < p.kv + p.activations + 16 * 2**20, (grew / 2**20, p.summary())


def test_cli_plan(tmp_path) -> None:  # noqa: ANN001
    from helpers.tiny_models import write_tiny_mistral

    folder = write_tiny_mistral(tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "leanlm", "plan", str(folder), "--ctx", "512", "--memory", "64M",
                          "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "of a 64 MiB budget" in run.stdout, run.stderr
    run = subprocess.run([sys.executable, "-m", "leanlm", "plan", str(folder), "--ctx", "512"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "--batch or --memory" in run.stderr and len(run.stderr.splitlines()) == 1
