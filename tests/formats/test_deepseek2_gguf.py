"""DeepSeek-V2 from GGUF against llama.cpp itself (fixtures from scripts/record_llamacpp_deepseek2.py).

The fixture is a random 2-block DeepSeek-V2 (q and kv latents, YaRN as DeepSeek ships it, a dense block,
then 4 routed experts with a shared one) written as F16 GGUF by `leanlm quantize`, and llama.cpp's top-8 ids
and logits at every position of a fixed token sequence. It checks our GGUF metadata and names (llama.cpp
loads the file) and our latent attention, YaRN and routing (the same logits) against an independent
implementation. llama.cpp multiplies F16 weights by F16-rounded activations, so its logits differ from
exact fp32 by up to ~0.02 here (measured: fp32 0.006, bf16 0.12).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FIXTURES

from leanlm.llm import load


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 0.03), ("bfloat16", 0.25)])
@torch.inference_mode()
def test_logits_match_llama_cpp(dtype: str, tol: float) -> None:
    ref = json.loads((FIXTURES / "llamacpp_deepseek2.json").read_text())
    llm = load(str(FIXTURES / "tiny_deepseek2.f16.gguf"), dtype=dtype, progress=False)
    cfg = llm.model.cfg
    assert cfg.mla is not None and cfg.mla.q_rank == 16 and cfg.yarn is not None and cfg.moe.n_shared == 1
    ids = torch.tensor([ref["ids"]])
    logits = llm.model(ids, torch.arange(ids.shape[1])[None])[0].float()  # (T, V)
    top_ids, top_logits = torch.tensor(ref["top_ids"]), torch.tensor(ref["top_logits"])
    assert (logits.gather(1, top_ids) - top_logits).abs().max().item() < tol  # llama.cpp's best 8, each position
    assert (logits.argmax(-1) == top_ids[:, 0]).float().mean().item() >= 0.9
    assert top_logits[:, 0].abs().max().item() > 1.0  # not a vanishing signal


def test_cached_decode_matches_one_pass() -> None:
    """The GGUF model through the cache (prefill, then single steps) gives the one-pass logits."""
    from leanlm.model.cache import ModelCache

    llm = load(str(FIXTURES / "tiny_deepseek2.f16.gguf"), dtype="float32", progress=False)
    m = llm.model
    ids = torch.tensor([json.loads((FIXTURES / "llamacpp_deepseek2.json").read_text())["ids"]])
    T = ids.shape[1]
    with torch.inference_mode():
        full = m(ids, torch.arange(T)[None])
        cache = ModelCache.for_model(m, 1, T, 8)
        cache.kv_len = 8
        steps = [m(ids[:, :8], torch.arange(8)[None], cache)]
        for t in range(8, T):
            cache.kv_len = t + 1
            steps.append(m(ids[:, t:t + 1], torch.tensor([[t]]), cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4
