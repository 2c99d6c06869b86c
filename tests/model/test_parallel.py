"""Tensor parallelism (tp.py): two processes over gloo, each with half of every block, give the logits of the
whole model, through a full pass and through the K/V cache, and decode the same greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.tiny_models import random_transformer, write_tiny_mistral

from leanlm.errors import LeanLMError, UnsupportedError
from leanlm.model.cache import ModelCache
from leanlm.model.config import MlaConfig, MoeConfig
from leanlm.runtime.generate import generate_ids

CONFIGS = {  # GQA with a sliding window; Gemma-like norms around both halves, qk norms, gelu, biases; Mixtral's
    # experts; DeepSeek's latent attention (queries through their own latent) with a dense block, then routed
    # and shared experts
    "gqa_swa": dict(windows=(4, None, 4)),
    "gemma_like": dict(windows=(None, 6), qk_norm=True, post_norms=True, act="gelu_tanh", attn_bias=True,
                       embed_scale=5.0),
    "mixtral_like": dict(windows=(None, 8), moe=MoeConfig(4, 2)),
    "deepseek_like": dict(windows=(None, None), n_kv_heads=4, head_dim=12, rope_dim=4, rope_interleaved=True,
                          mla=MlaConfig(24, 16, 8, 4, 6),
                          moe=MoeConfig(4, 2, hidden_dim=16, score_first=True, n_shared=1, first_dense=1)),
}


def reference(name: str) -> torch.nn.Module:
    cfg = dict(CONFIGS[name])
    return random_transformer(cfg.pop("windows"), **cfg)


def outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Logits of a full pass, of prefill + single steps through a cache, and 30 greedy tokens."""
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids, torch.arange(24)[None].expand(2, -1))
        cache = ModelCache(model.cfg, 2, 24, 4, torch.float32)
        steps = []
        for s, e in [(0, 4), (4, 8)] + [(i, i + 1) for i in range(8, 24)]:
            cache.kv_len = e
            steps.append(model(ids[:, s:e], torch.arange(s, e)[None].expand(2, -1), cache))
        greedy = torch.tensor(list(generate_ids(model, [3, 9, 27, 17], lambda lg, h: lg.argmax(-1), 30, chunk=4)))
    return {"full": full, "cached": torch.cat(steps, 1), "greedy": greedy}


def worker(rank: int, world: int, store: str, name: str, out: str) -> None:
    from leanlm.model.parallel import shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = reference(name)
        whole = sum(p.numel() for p in model.layers.parameters())
        model = shard(model, rank, world)
        assert sum(p.numel() for p in model.layers.parameters()) < 0.75 * whole  # each rank holds a share
        torch.save(outputs(model), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_the_whole_model(name: str, tmp_path: Path) -> None:
    want = outputs(reference(name))
    mp.spawn(worker, args=(2, str(tmp_path / "store"), name, str(tmp_path / "out")), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        assert (got["full"] - want["full"]).abs().max().item() < 1e-4
        assert (got["cached"] - want["cached"]).abs().max().item() < 1e-4
        assert got["greedy"].tolist() == want["greedy"].tolist()


def test_shard_refuses_what_it_cannot_split() -> None:
    from leanlm.model.parallel import shard

    with pytest.raises(LeanLMError, match="must divide the heads"):
        shard(random_transformer((None,)), 0, 3)  # 4 heads, 2 KV heads over 3 ranks
    with pytest.raises(LeanLMError, match="must divide the experts' width"):
        shard(random_transformer((None,), moe=MoeConfig(4, 2, hidden_dim=15)), 0, 2)
    m = random_transformer((None,))
    m.layers[0].attn.wo = torch.nn.Identity()  # stands for a quantized module: anything but a dense Linear
    with pytest.raises(UnsupportedError, match="dense weights"):
        shard(m, 0, 2)


def test_cli_under_torchrun_prints_one_answer(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m leanlm run ... --tensor-parallel`: rank 0 alone writes, and the greedy
    answer is the single-process one."""
    folder = write_tiny_mistral(tmp_path / "m")
    args = [str(folder), "The cat", "--raw", "--dtype", "float32", "--temperature", "0", "--max-tokens", "12",
            "--ignore-eos"]
    one = subprocess.run([sys.executable, "-m", "leanlm", "run", *args], capture_output=True, text=True, timeout=120)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "leanlm", "run",
                          *args, "--tensor-parallel"], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and len(one.stdout.strip()) > 0


def test_cli_without_torchrun_is_one_line(tmp_path: Path) -> None:
    folder = write_tiny_mistral(tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    run = subprocess.run([sys.executable, "-m", "leanlm", "run", str(folder), "hi", "--dtype", "float32",
                          "--tensor-parallel"], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1 and "torchrun" in run.stderr and len(run.stderr.strip().splitlines()) == 1
