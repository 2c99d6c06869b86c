"""Our own CPU kernels: small C files built with the machine's C compiler on first use, called via ctypes.

Plain C (no torch headers) builds in well under a second with `-O3 -march=native`, for the CPU it runs
on; the library is cached under ~/.cache/leanlm/kernels, keyed by the source, the flags and the CPU. The
kernels are exposed as torch custom ops (`torch.ops.leanlm.*`), so compiled decode steps call them too.
Where no compiler is found, or off CPU, the ops fall back to PyTorch's own kernels.

Kernels called many times per token are torch operators written in C++ instead (`ops_library`:
`torch.ops.leanlm_native.*`, kernels/*.cpp against torch's own headers, ~10 s to build once): a compiled
decode step calls those from its C++ wrapper without entering Python.

OpenMP: the library asks for libgomp.so.1, which resolves to the copy torch has already loaded, so both
share one thread pool (two pools would spin against each other on a small machine).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from leanlm.home import cache_root

KERNELS = Path(__file__).parent  # the C and C++ sources beside this file
# the parts of -ffast-math the vectoriser needs, not -ffast-math itself: linked into a shared library it
# switches on flush-to-zero for the whole process (seen: subnormal floats vanished in unrelated code)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
         "-freciprocal-math", "-fopenmp", "-shared", "-fPIC"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: tuple[str, str, str], flags: list[str], pattern: str, name: str,
           libs: tuple[str, ...] = ()) -> Path | None:
    """Compile kernels/<pattern> into one shared library, cached under cache_root()/kernels by a hash of
    the compiler, flags, CPU and sources; None where there is no compiler or the build fails.
    compiler: (environment variable, default, fallback), e.g. ("CC", "cc", "gcc")."""
    env, default, fallback = compiler
    cc = shutil.which(os.environ.get(env, default)) or shutil.which(fallback)
    if cc is None:
        return None
    sources = sorted(KERNELS.glob(pattern))
    h = hashlib.sha256(" ".join([cc, *flags, _cpu_id(), torch.__version__]).encode())
    for src in sources + sorted(KERNELS.glob("*.h")):  # the headers they share count too
        h.update(src.read_bytes())
    root = cache_root() / "kernels"
    so = root / f"{name}-{h.hexdigest()[:16]}.so"
    if not so.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".tmp{os.getpid()}")
        cmd = [cc, *flags, "-o", str(tmp), *map(str, sources), *libs]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            return None
        tmp.replace(so)
    return so


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel library, or None where it cannot be built (no compiler, not x86/ARM Linux...)."""
    so = _build(("CC", "cc", "gcc"), FLAGS, "*.c", "leanlm")
    if so is None:
        return None
    lib = ctypes.CDLL(str(so))
    lib.int8_matvec.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int]
    lib.int8_matvec.restype = None
    lib.int4_dense_bf16.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_int]
    lib.int4_dense_bf16.restype = None
    lib.int8_matvec_vnni.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int]
    lib.int8_matvec_vnni.restype = None
    lib.int8_vnni_available.restype = ctypes.c_int
    return lib


@functools.cache
def ops_library() -> bool:
    """Build (once, cached like `library`) and load kernels/*.cpp as torch operators; False where that
    cannot be done (no C++ compiler). Each file defines its operators only where the CPU has what it needs
    (AVX-512, VNNI): see `int4_vnni` and `attention`."""
    torch_dir = Path(torch.__file__).parent
    flags = ["-O3", "-march=native", "-std=c++17", "-w", "-fopenmp", "-shared", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{torch_dir / 'include'}", f"-L{torch_dir / 'lib'}"]
    so = _build(("CXX", "c++", "g++"), flags, "*.cpp", "leanlm-ops", ("-ltorch_cpu", "-lc10"))
    if so is None:
        return False
    torch.ops.load_library(str(so))
    ops = torch.ops.leanlm_native
    # shapes for torch.compile's tracing
    if hasattr(ops, "int4_mm"):
        torch.library.register_fake("leanlm_native::int4_mm")(
            lambda x, w, scales, mins: x.new_empty(x.shape[0], w.shape[0]))
        torch.library.register_fake("leanlm_native::int4_dense")(
            lambda w, scales, mins, planes, k: w.new_empty(w.shape[0], k // planes, dtype=torch.bfloat16))
    if hasattr(ops, "int8_mm"):
        torch.library.register_fake("leanlm_native::int8_mm")(
            lambda x, w, scales: x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32))
    if hasattr(ops, "attend"):
        torch.library.register_fake("leanlm_native::attend")(lambda q, k, v, mask, scale: torch.empty_like(
            q, memory_format=torch.contiguous_format))
    if hasattr(ops, "attend_int8"):
        torch.library.register_fake("leanlm_native::attend_int8")(
            lambda q, k, ks, v, vs, mask, scale: torch.empty_like(q, memory_format=torch.contiguous_format))
    if hasattr(ops, "cache_rows"):
        torch.library.register_fake("leanlm_native::cache_write")(lambda cache, slots, k, v: None)
        torch.library.register_fake("leanlm_native::cache_rows")(lambda cache, n: (
            cache[2].new_empty(*cache[2].shape[:2], n, cache[2].shape[3], dtype=torch.bfloat16),
            cache[2].new_empty(*cache[2].shape[:2], n, cache[2].shape[3], dtype=torch.bfloat16)))
    if hasattr(ops, "flash_attend"):
        torch.library.register_fake("leanlm_native::flash_attend")(lambda q, k, v, mask, scale: q.new_empty(
            q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2))
    if hasattr(ops, "rms_norm"):
        torch.library.register_fake("leanlm_native::rms_norm")(lambda x, w, eps: torch.empty_like(
            x, memory_format=torch.contiguous_format))
        torch.library.register_fake("leanlm_native::argmax")(lambda x: x.new_empty(x.shape[0], dtype=torch.long))
        torch.library.register_fake("leanlm_native::gated")(lambda g, u, kind: torch.empty_like(
            g, memory_format=torch.contiguous_format))
    return True


MAX_ROWS = 64  # beyond this many input rows (prefill, perplexity), PyTorch's kernel is used


@torch.library.custom_op("leanlm::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, kernel: int) -> torch.Tensor:
    """(x @ codes^T) * scales in fp32: x (M, K) any float dtype, codes (N, K) int8, scales (N,) bf16 -> (M, N).
    kernel (the model's plan, kernels/plan.py): 0 PyTorch's, 1 our C fp32 loops, 2 our C VNNI loops."""
    usable = kernel and x.device.type == "cpu" and codes.is_contiguous() and scales.is_contiguous()
    lib = library() if usable else None
    if lib is None or x.shape[0] > MAX_ROWS:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), codes, scales).float()
    x32 = x.float().contiguous()
    y = torch.empty(x.shape[0], codes.shape[0], dtype=torch.float32)
    run = lib.int8_matvec_vnni if kernel == 2 else lib.int8_matvec
    run(x32.data_ptr(), codes.data_ptr(), scales.data_ptr(), y.data_ptr(),
        x.shape[0], codes.shape[0], codes.shape[1], torch.get_num_threads())
    return y


@int8_matmul.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, kernel: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


def int4_dense(packed: torch.Tensor, scales_zeros: torch.Tensor, mults: torch.Tensor | None, g: int,
               n: int, k_packed: int) -> torch.Tensor | None:
    """The dense bf16 (N, K) weight of an Int4Linear (planes summed), or None where the kernel is missing
    or the layout is not one it handles (rows not a multiple of 64)."""
    lib = library() if packed.device.type == "cpu" else None
    P = 1 if mults is None else mults.numel()
    if lib is None or n % 64 or k_packed % 32 or k_packed % (g * P):
        return None
    out = torch.empty(n, k_packed // P, dtype=torch.bfloat16)
    m32 = None if mults is None else mults.float().flatten().contiguous()
    lib.int4_dense_bf16(packed.data_ptr(), scales_zeros.data_ptr(), None if m32 is None else m32.data_ptr(),
                        out.data_ptr(), n, k_packed, P, g, torch.get_num_threads())
    return out


def int4_dense_matches_torch() -> bool:
    """Does kernels/int4_dense.c read the layout this torch build packs int4 weights in? torch picks the packed
    layout by the CPU it runs on (its AVX-512 build is the one the C kernel was written for), so a probe
    matrix is packed and unpacked once: where they disagree, prefill stays on torch's own int4 kernel."""
    if library() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    n, k = 128, 64
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([torch.ones(k // 32, n), torch.full((k // 32, n), 8.0)], dim=-1).to(torch.bfloat16)
    dense = int4_dense(packed, sz.contiguous(), None, 32, n, k)  # (q - 8) * 1 + 8 = q
    return dense is not None and torch.equal(dense.float(), q.float())
