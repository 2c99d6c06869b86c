"""The decode step compiled once per model layout and kept on disk.

Eager PyTorch spends most of a decode step dispatching ~40 small ops per layer. `torch.compile`
(inductor with its C++ wrapper) fuses the elementwise work into a few loops and calls the int4/int8
kernels directly, which more than doubles decode speed on a 2-core CPU (bench/NOTES.md). Compiling
takes a minute or two, so the result is saved with torch's ahead-of-time compile API and loaded in
about 2 s by later processes.

The compiled function takes the model and the cache as arguments: weights are read from them at each
call, never copied into the artifact. Everything the graph depends on that is not a tensor shape goes
into the artifact's key (`layout_key`): the config, every parameter's and buffer's name, shape and
dtype, the model's kernel plan (kernels/plan.py: the routes its modules took), the layout of the cache it
was traced with (`ModelCache.layout`: rows, blocked keys, int8, latent; dtype), the source of the modules
the graph runs, of the caches and of our kernels, torch's version and the step kind (`StepKind`).
Cache sizes, `kv_len` and the batch size (>= 2) are dynamic, so one artifact serves every context
length. Torch's own guard check is switched off after loading (it rejects inference-mode tensors);
`layout_key` is the guard, and a loaded step refuses a cache of another layout than its key's.
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

from leanlm.errors import LeanLMError
from leanlm.home import cache_root
from leanlm.kernels.plan import KernelPlan
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer
from leanlm.runtime.steps.eager import Step, StepKind, decode_step, verify_step

NAME = "compiled"
_SOURCES = ("model/transformer.py", "model/attention.py", "model/layers.py", "model/rope.py", "model/mla.py",
            "model/cache.py", "model/kv_int8.py", "model/moe.py", "runtime/steps/compiled.py",
            "runtime/steps/eager.py", "kernels/build.py", "kernels/plan.py", "quant/int4.py", "quant/int8.py")


def cache_dir() -> Path:
    return cache_root() / "compiled"


def _inductor_dir() -> contextlib.AbstractContextManager:
    """Inductor's own cache (the C++ it built) beside our artifacts: loading without it recompiles the C++
    (a minute), and its default home under /tmp does not survive reboots."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    return temporary_cache_dir(str(cache_dir() / "inductor"))


def layout_key(model: Transformer, kind: StepKind) -> str:
    """What a compiled step depends on besides tensor sizes (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|batch={kind.name}|{model.cfg!r}".encode())
    h.update(f"|kv={model.kv_cache}|cache={ModelCache.layout_for(model)}|plan={model.plan.key()}".encode())
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


def _example(model: Transformer, kind: StepKind) -> tuple:
    """Inputs to trace with. Sizes of 0 or 1 would be specialised, so the buffers hold 64 positions (and a
    batched step traces 2 rows)."""
    batch = 2 if kind.batched else 1
    cache = ModelCache.for_model(model, batch, 64, 16)
    for t in cache.tensors():  # slot tables (B, S) and K/V (B, n_kv, S, hd): S varies, and B when batched
        if t.dim() == 4:
            torch._dynamo.mark_static(t, 1)
            torch._dynamo.mark_static(t, 3)
    if kind.block:  # verified blocks: T varies (5 here), and B when batched
        tokens = torch.zeros(batch, 5, dtype=torch.long, device=model.device)
        positions = torch.arange(36, 41, device=model.device).repeat(batch, 1)
        return (model, cache, tokens, positions, 41)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    positions = torch.full((batch, 1), 40, dtype=torch.long, device=model.device)
    return (model, cache, tokens, positions, 41)


def compile_step(model: Transformer, kind: StepKind, path: Path) -> None:
    """Compile the decode (or verify) step for this layout and save it at path (takes a minute or more). The
    modules' routes are plain attributes fixed by the model's plan, so tracing reads them as constants."""
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as shape_config

    fn = torch.compile(verify_step if kind.block else decode_step, dynamic=True, fullgraph=True)
    # no duck shaping: two sizes that happen to be equal in the example (a 64-slot buffer and a head dim
    # of 64) must not be assumed equal forever. emulate_precision_casts: round wherever the model casts to
    # bf16, as eager does; otherwise fused loops keep some values in fp32, and differently in the decode and
    # the verify graphs, so a verified block would not score exactly like single steps (bench/NOTES.md)
    with _inductor_dir(), inductor_config.patch(cpp_wrapper=True, emulate_precision_casts=True), \
            torch._dynamo.config.patch(specialize_float=True), \
            shape_config.patch(use_duck_shape=False), torch.inference_mode():
        compiled = fn.aot_compile((_example(model, kind), {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    compiled.save_compiled_function(str(tmp))
    tmp.replace(path)


def load_step(path: Path, kind: StepKind, layout: str) -> Step:
    """The step saved at path; it was traced with caches of `layout` (`ModelCache.layout`) and refuses others."""
    with open(path, "rb") as f, _inductor_dir():
        step = torch.compiler.load_compiled_function(f)
    step.disable_guard_check()  # layout_key stands in for torch's guards (module docstring)

    def run(model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
            kv_len: int) -> torch.Tensor:
        if cache.layout != layout:  # the graph indexes the cache's tensors as they were laid out when traced
            raise LeanLMError(f"this compiled step was built for a {layout} K/V cache, not {cache.layout}")
        # the graph was traced with contiguous inputs and assumes them
        return step(model, cache, tokens.contiguous(), positions.contiguous(), kv_len)

    return Step(NAME, kind, run)


def supports(model: Transformer, kind: StepKind, plan: KernelPlan) -> bool:
    return True  # any model traces; whether a step is saved (or may be built) is `build`'s question


def build(model: Transformer, kind: StepKind, mode: str = "auto",
          log: Callable[[str], None] | None = None) -> Step | None:
    """The compiled step for this model and kind if allowed (mode "on" compiles a missing one; "auto" loads a
    saved one, on the CPU) and loadable, else None."""
    if mode == "off" or model.device.type != "cpu" and mode == "auto":
        return None
    what = "verify" if kind.block else "decode"
    path = cache_dir() / f"{what}-{layout_key(model, kind)}.bin"
    if not path.exists():
        if mode != "on":
            return None
        if log:
            log(f"compiling the {what} step for this model (once; saved in {path.parent})")
        with contextlib.redirect_stdout(io.StringIO()):
            compile_step(model, kind, path)
    try:
        return load_step(path, kind, ModelCache.layout_for(model))
    except Exception as e:  # a damaged or foreign artifact must not stop generation: the next backend runs
        if log:
            log(f"could not load the compiled {what} step {path} ({type(e).__name__}: {e}); running eagerly")
        return None
