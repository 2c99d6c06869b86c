"""Record llama.cpp's logits on a tiny DeepSeek-V2 GGUF as test fixtures (tests/test_deepseek2_gguf.py).

Usage: python scripts/record_llamacpp_deepseek2.py [--out tests/fixtures]

Builds a random 2-block DeepseekV2ForCausalLM with transformers (q latent, kv latent, YaRN as DeepSeek-V2
ships it, one dense block then 4 routed experts with a shared one), writes it as an F16 GGUF with
`leanlm quantize` (so llama.cpp reads our DeepSeek metadata and names), and stores llama.cpp's top-8 ids and
logits at every position of a fixed token sequence. The GGUF itself is the fixture too (~300 KB): the test
does not depend on transformers' initialisation staying the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

IDS = [1, 37, 402, 118, 9, 255, 77, 301, 64, 88, 150, 499, 12, 240, 33, 76, 310, 5, 420, 199, 61, 144, 27,
       380, 90, 216, 47, 333, 128, 71]


def build(folder: Path) -> None:
    import transformers
    from tiny_tokenizer import write_tiny_tokenizer

    cfg = transformers.DeepseekV2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             mscale=0.707, mscale_all_dim=0.707),
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.DeepseekV2ForCausalLM(cfg).save_pretrained(folder)
    write_tiny_tokenizer(folder, kind="sentencepiece", vocab_size=512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    out = Path(ap.parse_args().out)
    from llama_cpp import Llama

    from leanlm.tools.quantize import quantize

    with tempfile.TemporaryDirectory() as d:
        build(Path(d) / "hf")
        gguf = out / "tiny_deepseek2.f16.gguf"
        quantize(Path(d) / "hf", gguf, "f16", progress=False)
    m = Llama(str(gguf), verbose=False, n_ctx=64, logits_all=True)
    m.eval(IDS)
    scores = torch.tensor(m.scores[:len(IDS)])
    top = scores.topk(8, dim=-1)
    data = {"ids": IDS, "top_ids": top.indices.tolist(),
            "top_logits": [[round(x, 4) for x in row] for row in top.values.tolist()],
            "llama_cpp_python": __import__("llama_cpp").__version__}
    (out / "llamacpp_deepseek2.json").write_text(json.dumps(data) + "\n")
    print(f"wrote {gguf} and {out / 'llamacpp_deepseek2.json'}")


if __name__ == "__main__":
    main()
