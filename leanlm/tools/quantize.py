"""`leanlm quantize`: write a GGUF file that both leanlm and llama.cpp read, in any block format we
quantize to, by round-to-nearest, GPTQ or AWQ.

Which tensor gets which type (llama.cpp's quantize makes the same kind of choices):
- 1-D tensors (norms, biases) and the MoE router stay F32.
- The output head (the token embedding when they are tied) is Q8_0, or Q6_K for k-quant targets when
  its rows are a multiple of 256: it is read for every token and its errors hit every logit.
- Every other matrix gets the requested type. k-quants need rows that are a multiple of 256; other
  matrices fall back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0.
- GPTQ and AWQ apply to the transformer blocks' Linear weights; embeddings and head are RTN.
The source is a GGUF file (any type: it is dequantized first) or a Hugging Face checkpoint folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType

from leanlm.errors import LeanLMError, UnsupportedError
from leanlm.model.config import ModelConfig
from leanlm.quant.writable import get_format

Q = GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
         "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}
FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
              Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
              Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1, Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
              Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_S, Q.Q6_K: LlamaFileType.MOSTLY_Q6_K}
METHODS = ("rtn", "gptq", "awq")
_FLOAT = (Q.F32, Q.F16, Q.BF16)
_KQUANT_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_SKIP_META = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


@dataclass
class QuantReport:
    path: Path
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> type written
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB of tensors: {kinds}) in {self.seconds:.1f} s"


def tensor_type(name: str, shape: tuple[int, ...], target: GGMLQuantizationType, tied: bool) -> GGMLQuantizationType:
    """The type `name` is written in when the file's type is `target` (rules in the module docstring)."""
    if len(shape) < 2 or "ffn_gate_inp" in name:
        return Q.F32
    if target in _FLOAT:
        return target
    K = shape[-1]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        target = Q.Q6_K if target in _KQUANT_FALLBACK else Q.Q8_0
    if K % get_format(target).block:
        target = _KQUANT_FALLBACK.get(target, Q.F16)
        if target != Q.F16 and K % get_format(target).block:
            target = Q.F16
    return target


def _float_bytes(w: torch.Tensor, t: GGMLQuantizationType) -> np.ndarray:
    if t == Q.F32:
        return w.float().numpy()
    if t == Q.F16:
        return w.half().numpy()
    return w.bfloat16().view(torch.int16).numpy().view(np.uint8).reshape(*w.shape[:-1], -1)


def _pack(w: torch.Tensor, t: GGMLQuantizationType, H: torch.Tensor | None) -> np.ndarray:
    """GGUF data for weight w (rows..., K): float as is, or quantized (GPTQ when H is given)."""
    if t in _FLOAT:
        return _float_bytes(w, t)
    fmt = get_format(t)
    w2 = w.float().reshape(-1, w.shape[-1])
    if H is not None:
        from leanlm.quant.gptq import gptq

        codes, fit = gptq(w2, H, fmt)
    else:
        fit = fmt.fit(w2)
        codes = fmt.codes(w2, fit)
    return fmt.pack(codes, fit).reshape(*w.shape[:-1], -1)


def _copy_metadata(src: Path, w: GGUFWriter, only: str | None = None) -> None:
    """Copy GGUF file `src`'s metadata into `w` (only the keys starting with `only`, if given)."""
    from leanlm.formats.gguf_file import GGUFFile

    f = GGUFFile(src)
    for key, val in f.metadata.items():
        if key in _SKIP_META or (only is not None and not key.startswith(only)):
            continue
        vtype, item = f.value_types[key]
        w.add_key_value(key, val, GGUFValueType(vtype), GGUFValueType(item) if item is not None else None)


def quantize(src: str | Path, dst: str | Path, qtype: str = "q4_0", *, method: str = "rtn",
             calibration: str | Path | None = None, calib_tokens: int = 8192, seq_len: int = 512,
             progress: bool = True) -> QuantReport:
    """Quantize checkpoint `src` (GGUF file or HF folder) into GGUF file `dst`."""
    from tqdm import tqdm

    from leanlm.formats import load_model
    from leanlm.formats.gguf_loader import _MAPPERS
    from leanlm.formats.gguf_writer import GGUF_ARCH, gguf_tensors
    from leanlm.formats.hub import resolve_model

    t0 = time.perf_counter()
    src, dst = resolve_model(str(src), progress=progress), Path(dst)
    target = _target_type(src, dst, qtype, method, calibration)
    model, tok = load_model(src, torch.float32)
    cfg = model.cfg
    if cfg.arch not in GGUF_ARCH:
        raise UnsupportedError(f"cannot write architecture {cfg.arch} as GGUF")
    arch = GGUF_ARCH[cfg.arch]
    mapper = _MAPPERS[arch]

    def module_of(gguf_name: str) -> str | None:
        targets = mapper(gguf_name)
        return targets[0].rsplit(".", 1)[0] if targets and targets[0].endswith(".weight") else None

    shapes = {n: tuple(t.shape) for n, t in gguf_tensors(model, arch).items()}
    types = {n: tensor_type(n, s, target, cfg.tie_embeddings) for n, s in shapes.items()}
    from leanlm.quant import calibrate

    hessians: dict[str, torch.Tensor] = {}
    if method != "rtn":
        text = Path(calibration).read_text(encoding="utf-8")  # type: ignore[arg-type]
        bos = tok.bos_id if getattr(tok, "add_bos", False) else None
        batches = calibrate.windows(tok.encode(text, add_bos=False), seq_len, calib_tokens, bos)
        if not batches:
            raise LeanLMError(f"calibration text {calibration} is too short")
        names = sorted({calibrate.input_owner(n) for n in calibrate.linears(model)})
        hessians, inputs = calibrate.collect(model, batches, names, hessians=method == "gptq",
                                             max_inputs=512 if method == "awq" else 0, progress=progress)
        if method == "awq":
            from leanlm.quant.awq import apply_awq

            by_module = {module_of(n): t for n, t in types.items()}
            apply_awq(model, inputs, lambda m: get_format(by_module[m]) if by_module.get(m) not in
                      (None, *_FLOAT) else None, progress=progress)
    w = _writer(src, cfg, arch, target)
    report = QuantReport(dst)
    tensors = gguf_tensors(model, arch)
    for name, t in tqdm(tensors.items(), desc=f"quantizing to {qtype}", unit="tensor", disable=not progress):
        mod = module_of(name)
        H = hessians.get(calibrate.input_owner(mod)) if mod is not None and types[name] not in _FLOAT else None
        data = _pack(t.detach(), types[name], H)
        w.add_tensor(name, data, raw_dtype=types[name] if data.dtype == np.uint8 else None)
        report.types[name] = types[name].name
        report.bytes += data.nbytes
    tmp = dst.with_name(dst.name + ".partial")
    w.write_header_to_file(path=tmp)
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    tmp.replace(dst)
    report.seconds = time.perf_counter() - t0
    return report


def _target_type(src: Path, dst: Path, qtype: str, method: str, calibration: str | Path | None) -> GGMLQuantizationType:
    """The weight matrices' GGUF type, once the arguments are known to fit together."""
    if qtype not in TYPES:
        raise LeanLMError(f"unknown type '{qtype}' (choose from {', '.join(TYPES)})")
    if method not in METHODS:
        raise LeanLMError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    target = TYPES[qtype]
    if method != "rtn" and (target in _FLOAT or calibration is None):
        raise LeanLMError(f"--method {method} needs a quantized --type and a --calibration text file")
    if dst.resolve() == src.resolve():
        raise LeanLMError("the output path is the source checkpoint; choose another")
    if calibration is not None and not Path(calibration).is_file():
        raise LeanLMError(f"no such calibration file: {calibration}")
    return target


def _writer(src: Path, cfg: ModelConfig, arch: str, target: GGMLQuantizationType) -> GGUFWriter:
    """A GGUF writer holding the output's metadata: the source file's own, or (for an HF folder) the config's
    and the tokenizer's."""
    w = GGUFWriter(None, arch)
    if src.is_file():
        _copy_metadata(src, w)
    else:
        from leanlm.formats.gguf_writer import write_metadata
        from leanlm.formats.tokenizer_export import write_tokenizer

        write_metadata(w, cfg, arch)
        write_tokenizer(w, src)
    w.add_file_type(FILE_TYPES[target])
    w.add_quantization_version(2)
    return w
