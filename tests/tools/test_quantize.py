"""`leanlm quantize`: files with the documented type mix that we and llama.cpp read; GPTQ and AWQ do
what they promise (less layer-output error than round-to-nearest; AWQ's rescaling is exact in float)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

import leanlm
from leanlm.formats.gguf_file import GGUFFile
from leanlm.model.config import ModelConfig
from leanlm.model.transformer import Transformer
from leanlm.quant.awq import apply_awq, fake_quant
from leanlm.quant.blocks import dequant
from leanlm.quant.calibrate import collect, linears
from leanlm.quant.gptq import gptq
from leanlm.quant.writable import get_format
from leanlm.tools.cli import main
from leanlm.tools.quantize import quantize, tensor_type

Q = GGMLQuantizationType
PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side."


def test_type_mix_rules() -> None:
    assert tensor_type("blk.0.attn_norm.weight", (576,), Q.Q4_0, True) == Q.F32
    assert tensor_type("blk.0.attn_q.weight", (576, 576), Q.Q4_0, True) == Q.Q4_0
    assert tensor_type("token_embd.weight", (49152, 576), Q.Q4_0, True) == Q.Q8_0  # tied: it is the head
    assert tensor_type("token_embd.weight", (49152, 576), Q.Q4_0, False) == Q.Q4_0
    assert tensor_type("output.weight", (49152, 512), Q.Q4_K, False) == Q.Q6_K
    assert tensor_type("output.weight", (49152, 576), Q.Q4_K, False) == Q.Q8_0
    assert tensor_type("blk.0.ffn_up.weight", (1536, 576), Q.Q4_K, True) == Q.Q5_0  # 576 % 256 != 0
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), Q.Q4_K, True) == Q.Q4_K
    assert tensor_type("blk.0.ffn_down.weight", (640, 2048), Q.Q4_K, True) == Q.Q4_K
    assert tensor_type("blk.0.ffn_down.weight", (640, 2048), Q.Q6_K, True) == Q.Q6_K
    assert tensor_type("blk.0.attn_q.weight", (640, 640), Q.Q6_K, True) == Q.Q8_0
    assert tensor_type("blk.0.ffn_gate_inp.weight", (8, 4096), Q.Q4_0, True) == Q.F32
    assert tensor_type("blk.0.attn_q.weight", (576, 576), Q.F16, True) == Q.F16


@torch.inference_mode()
def _logits(path: Path, text: str = PROMPT) -> torch.Tensor:
    llm = leanlm.load(path, dtype="float32")
    ids = torch.tensor([llm.tokenizer.encode(text)])
    return llm.model(ids, torch.arange(ids.shape[1])[None])[0]


def test_q8_0_file_keeps_metadata_and_model(smol_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8.gguf"
    report = quantize(smol_path, out, "q8_0", progress=False)
    src, f = GGUFFile(smol_path), GGUFFile(out)
    assert f.metadata["general.file_type"] == 7  # MOSTLY_Q8_0
    assert f.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
    assert f.metadata["tokenizer.chat_template"] == src.metadata["tokenizer.chat_template"]
    assert {n: i.qtype.name for n, i in f.tensors.items()} == report.types
    assert f.tensors["blk.3.ffn_down.weight"].qtype == Q.Q8_0 and f.tensors["output_norm.weight"].qtype == Q.F32
    a, b = _logits(smol_path), _logits(out)  # Q8_0 of the Q4_1 weights: nearly lossless
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    print(f"KL(Q4_1 file || our Q8_0 of it) = {kl:.2e}")
    assert kl < 1e-2


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))  # some channels much larger, as in real activations
    return (torch.randn(n, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0])
def test_gptq_has_less_output_error_than_rtn(qtype: GGMLQuantizationType) -> None:
    fmt = get_format(qtype)
    X = _correlated_inputs(2048, 256)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    H = 2 * X.t() @ X / len(X)
    codes, fit = gptq(W, H, fmt)
    err_gptq = (X @ (W - dequant(codes, fit, fmt.group)).t()).pow(2).mean()
    err_rtn = (X @ (W - fake_quant(W, fmt)).t()).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def _tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      hidden_dim=128, norm_eps=1e-5, context_length=128, rope_base=10000.0,
                      layer_windows=(None, None))
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 2.0)  # non-trivial norms: folding 1/s into them must stay exact
    return model


@torch.no_grad()
def test_awq_rescaling_is_exact_in_float_and_lowers_quantized_error() -> None:
    model = _tiny()
    tokens = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(48)[None]
    before = model(tokens, pos)
    names = list(linears(model))
    _, inputs = collect(model, [tokens], names, hessians=False, max_inputs=256)
    fmt = get_format(Q.Q4_0)
    rtn_err = {n: (inputs[n] @ (model.get_submodule(n).weight - fake_quant(model.get_submodule(n).weight, fmt)).t())
               .pow(2).mean() for n in names}
    report = apply_awq(model, inputs, lambda n: fmt)
    assert set(report) == {f"layers.{i}.{p}" for i in range(2) for p in ("attn_norm", "attn.wv", "ffn_norm", "ffn.w3")}
    after = model(tokens, pos)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()  # x W^T == (x / s) (W s)^T
    _, moved = collect(model, [tokens], names, hessians=False, max_inputs=256)
    total_rtn = sum(rtn_err.values())
    total_awq = sum((moved[n] @ (model.get_submodule(n).weight - fake_quant(model.get_submodule(n).weight, fmt)).t())
                    .pow(2).mean() for n in names)
    assert total_awq <= total_rtn


def test_cli_quantize_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          smol_path: Path) -> None:
    assert main(["quantize", str(smol_path), str(tmp_path / "o.gguf"), "--method", "gptq"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanlm: error:") and "calibration" in err and "\n" not in err
    assert main(["quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf")]) == 1
    assert not (tmp_path / "o.gguf").exists()


def test_llamacpp_reads_our_q4_0_file(smol_path: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "q4.gguf"
    quantize(smol_path, out, "q4_0", progress=False)
    ours = _logits(out)
    lcpp = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    ids = lcpp.tokenize(PROMPT.encode(), add_bos=False, special=False)
    assert ids == leanlm.load(out).tokenizer.encode(PROMPT)
    lcpp.eval(ids)
    theirs = torch.tensor(lcpp.scores[: len(ids)])
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert top1 >= 0.9  # llama.cpp quantizes activations to 8 bits inside its dot products
    assert (ours - theirs).abs().mean() < 0.1 * ours.abs().mean()


@torch.inference_mode()
def test_hf_folder_source_keeps_tokenizer_and_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from helpers.tiny_models import write_tiny_mistral

    folder = write_tiny_mistral(tmp_path / "hf", tokenizer_kind="bytelevel")
    out = tmp_path / "q8.gguf"
    quantize(folder, out, "q8_0", progress=False)
    hf, ours = leanlm.load(folder, dtype="float32"), leanlm.load(out, dtype="float32")
    text = "def greet(name): return 'hello ' + name  # 123 éü"
    assert ours.tokenizer.encode(text) == hf.tokenizer.encode(text)
    assert ours.chat_prompt([{"role": "user", "content": "hi"}]) == hf.chat_prompt([{"role": "user", "content": "hi"}])
    ids = torch.tensor([hf.tokenizer.encode(text)])
    pos = torch.arange(ids.shape[1])[None]
    a, b = hf.model(ids, pos), ours.model(ids, pos)
    sa, sb = hf.model.state_dict(), ours.model.state_dict()
    for name, w in sa.items():  # q8_0 rounding only: ~0.5% per matrix (the f32 file matches to 1e-5)
        if ".wq." in name or ".wk." in name:
            continue  # GGUF llama keeps q/k rows in rotary-pair order, a permutation of these
        assert (w - sb[name]).norm() <= 0.01 * w.norm(), name
    assert (a - b).abs().mean() < 0.05 * a.abs().mean()  # a random 2-layer model amplifies it ~6x
