"""The decode step compiled once per model layout and kept on disk.

Eager PyTorch spends most of a decode step dispatching ~40 small ops per layer. `torch.compile`
(inductor with its C++ wrapper) fuses the elementwise work into a few loops and calls the int4/int8
kernels directly, which more than doubles decode speed on a 2-core CPU (bench/NOTES.md). Compiling
takes a minute or two, so the result is saved with torch's ahead-of-time compile API and loaded in
about 2 s by later processes.

The compiled function takes the model and the cache as arguments: weights are read from them at each
call, never copied into the artifact. Everything the graph depends on that is not a tensor shape goes
into the artifact's key (`layout_key`): the config, every parameter's and buffer's name, shape and
dtype, the source of the modules the graph runs and of our kernels, torch's version and the batch kind
(1 or >= 2).
Cache sizes, `kv_len` and the batch size (>= 2) are dynamic, so one artifact serves every context
length. Torch's own guard check is switched off after loading (it rejects inference-mode tensors);
`layout_key` is the guard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer

# one step: (model, cache, tokens (B, 1), positions (B, 1), kv_len) -> next-token logits (B, V) fp32
DecodeStep = Callable[[Transformer, ModelCache, torch.Tensor, torch.Tensor, int], torch.Tensor]
MODES = ("auto", "on", "off")  # auto: use a saved step if there is one; on: compile when missing
_SOURCES = ("model/transformer.py", "model/attention.py", "model/layers.py", "model/rope.py", "model/mla.py",
            "model/cache.py", "model/moe.py", "runtime/steps/compiled.py",
            "kernels/build.py", "quant/int4.py", "quant/int8.py")


def decode_step(model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                kv_len: int) -> torch.Tensor:
    """tokens, positions (B, 1) -> logits (B, V) of the next token; the eager form of the compiled step."""
    return model(tokens, positions, cache, kv_len=kv_len)[:, -1]


def verify_step(model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                kv_len: int) -> torch.Tensor:
    """tokens, positions (B, T >= 2) -> logits (B, T, V): a speculative round's check of T tokens per row."""
    return model(tokens, positions, cache, kv_len=kv_len)


def step_kind(batch: int, tokens: int) -> str:
    """The graph kinds: one sequence, a batch (>= 2) of sequences, and the same two checking blocks of
    T >= 2 tokens per sequence (speculative decoding)."""
    if tokens > 1:
        return "verify" if batch == 1 else "nverify"
    return "1" if batch == 1 else "n"


def cache_dir() -> Path:
    root = os.environ.get("LEANLM_CACHE") or Path.home() / ".cache" / "leanlm"
    return Path(root) / "compiled"


def _inductor_dir() -> contextlib.AbstractContextManager:
    """Inductor's own cache (the C++ it built) beside our artifacts: loading without it recompiles the C++
    (a minute), and its default home under /tmp does not survive reboots."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    return temporary_cache_dir(str(cache_dir() / "inductor"))


def layout_key(model: Transformer, batch: int, tokens: int = 1) -> str:
    """What a compiled step depends on besides tensor sizes (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|batch={step_kind(batch, tokens)}|{model.cfg!r}".encode())
    h.update(f"|kv={model.kv_cache}".encode())  # the cache's tensors differ (kv_int8.py)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"|{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type}".encode())
    for mod in model.modules():
        h.update(type(mod).__qualname__.encode())
    here = Path(__file__).parent.parent.parent  # the package root
    for src in _SOURCES:
        h.update((here / src).read_bytes())
    for src in sorted((here / "kernels").glob("*.[ch]*")):  # the graph calls our operators: a step built
        h.update(src.read_bytes())  # against another build of them needs inductor to rebuild its C++ (which fails)
    return h.hexdigest()[:24]


def _example(model: Transformer, batch: int, n_tokens: int = 1) -> tuple:
    """Inputs to trace with. Sizes of 0 or 1 would be specialised, so the buffers hold 64 positions."""
    cache = ModelCache.for_model(model, batch, 64, 16)
    for t in cache.tensors():  # slot tables (B, S) and K/V (B, n_kv, S, hd): S varies, and B when batched
        if t.dim() == 4:
            torch._dynamo.mark_static(t, 1)
            torch._dynamo.mark_static(t, 3)
    if n_tokens > 1:  # verified blocks: T varies (5 here), and B when batched
        tokens = torch.zeros(batch, 5, dtype=torch.long, device=model.device)
        positions = torch.arange(36, 41, device=model.device).repeat(batch, 1)
        return (model, cache, tokens, positions, 41)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    positions = torch.full((batch, 1), 40, dtype=torch.long, device=model.device)
    return (model, cache, tokens, positions, 41)


def compile_step(model: Transformer, batch: int, path: Path, tokens: int = 1) -> None:
    """Compile the decode (or verify) step for this layout and save it at path (takes a minute or more)."""
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as shape_config

    from leanlm.model import attention, layers

    torch.compiler.assume_constant_result(attention._native_attention)  # asked once while tracing, not traced
    torch.compiler.assume_constant_result(layers._native_rows)
    torch.compiler.assume_constant_result(attention._native_flash)
    fn = torch.compile(verify_step if tokens > 1 else decode_step, dynamic=True, fullgraph=True)
    # no duck shaping: two sizes that happen to be equal in the example (a 64-slot buffer and a head dim
    # of 64) must not be assumed equal forever. emulate_precision_casts: round wherever the model casts to
    # bf16, as eager does; otherwise fused loops keep some values in fp32, and differently in the decode and
    # the verify graphs, so a verified block would not score exactly like single steps (bench/NOTES.md)
    with _inductor_dir(), inductor_config.patch(cpp_wrapper=True, emulate_precision_casts=True), \
            torch._dynamo.config.patch(specialize_float=True), \
            shape_config.patch(use_duck_shape=False), torch.inference_mode():
        compiled = fn.aot_compile((_example(model, batch, tokens), {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    compiled.save_compiled_function(str(tmp))
    tmp.replace(path)


def load_step(path: Path) -> DecodeStep:
    with open(path, "rb") as f, _inductor_dir():
        step = torch.compiler.load_compiled_function(f)
    step.disable_guard_check()  # layout_key stands in for torch's guards (module docstring)

    def run(model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
            kv_len: int) -> torch.Tensor:  # the graph was traced with contiguous inputs and assumes them
        return step(model, cache, tokens.contiguous(), positions.contiguous(), kv_len)

    return run


def get_step(model: Transformer, batch: int, mode: str = "auto",
             log: Callable[[str], None] | None = None, tokens: int = 1) -> DecodeStep:
    """The compiled step for this model and kind (batch size, or tokens > 1: the speculative verify step)
    if allowed and available, else the eager one."""
    eager = verify_step if tokens > 1 else decode_step
    if mode == "off" or model.device.type != "cpu" and mode == "auto":
        return eager
    what = "verify" if tokens > 1 else "decode"
    path = cache_dir() / f"{what}-{layout_key(model, batch, tokens)}.bin"
    if not path.exists():
        if mode != "on":
            return eager
        if log:
            log(f"compiling the {what} step for this model (once; saved in {path.parent})")
        with contextlib.redirect_stdout(io.StringIO()):
            compile_step(model, batch, path, tokens)
    try:
        return load_step(path)
    except Exception as e:  # a damaged or foreign artifact must not stop generation: stay eager
        if log:
            log(f"could not load the compiled {what} step {path} ({type(e).__name__}: {e}); running eagerly")
        return eager
