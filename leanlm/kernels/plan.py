"""The kernel plan: which of our kernels a model runs on, decided once at load and kept on the model.

`KernelPlan.resolve(device)` asks the CPU (through what the built libraries register: each kernels/*.cpp file
defines its operators only where the CPU has what they need) once per process, and reads every `LEANLM_*`
kernel switch here and nowhere else:

    LEANLM_NATIVE=0             none of our kernels (nothing is built)
    LEANLM_VNNI=0               PyTorch's int4 kernel, the untiled head on fp32 math (no VNNI layouts)
    LEANLM_AMX=0                int4 products of 32 rows or more stay on the VNNI loops (kernels/amx.cpp)
    LEANLM_NATIVE_ROWS=0        norms, gated activations and greedy choice on PyTorch's ops
    LEANLM_NATIVE_ATTENTION=0   few-query attention as fp32 reductions in PyTorch
    LEANLM_NATIVE_FLASH=0       prompt attention on SDPA
    LEANLM_BLOCKED_KEYS=0       keys kept as rows, not in blocks of 16 slots (model/cache.py)
    LEANLM_NATIVE_STEP=0        no C++ decode step (runtime/steps/cpp.py)
    LEANLM_WEIGHT_CACHE=0       loaded models are not saved and mapped (formats/weight_cache.py)

The plan is frozen: `Transformer.apply_plan` hands it to the modules, which fix their routes then; caches take it
from the model (`ModelCache.for_model`); its `key()` is part of every on-disk key (weight cache, compiled steps),
so nothing saved under one plan is used under another. Head-dim eligibility of the attention kernels is spelled
here once (`few_query_fits`, `flash_fits`, `cache_kernels_fit`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from leanlm.kernels import build

if TYPE_CHECKING:
    from leanlm.model.config import ModelConfig

FLASH_HEAD_DIMS = (64, 96, 128, 256)  # kernels/flash.cpp's head dims
CACHE_HEAD_DIMS = (64, 128, 256)  # blocked keys (attend_blocked.cpp) and the int8 cache (attend_int8.cpp)


def few_query_fits(head_dim: int) -> bool:
    """Head dims kernels/attention.cpp, attend_blocked.cpp and decode.cpp take: whole vectors of 16."""
    return head_dim % 16 == 0


def flash_fits(head_dim: int) -> bool:
    return head_dim in FLASH_HEAD_DIMS


def cache_kernels_fit(head_dim: int) -> bool:
    return head_dim in CACHE_HEAD_DIMS


@functools.cache
def _probe() -> frozenset[str]:
    """What this CPU runs, as the libraries built for it register: their operator names, plus "c" (the C
    library), "c_dense" (its unpacking of torch's int4 layout agrees with this torch), "c_vnni" (its VNNI head),
    "amx" (tiles granted to this process) and "decoder" (the C++ step)."""
    found: set[str] = set()
    lib = build.library()
    if lib is not None:
        found.add("c")
        if build.int4_dense_matches_torch():
            found.add("c_dense")
        if lib.int8_vnni_available():
            found.add("c_vnni")
    if not build.ops_library():
        return frozenset(found)
    ops = torch.ops.leanlm_native
    found.update(name for name in ("int4_mm", "int8_mm", "attend", "attend_int8", "flash_attend", "rms_norm",
                                   "argmax", "amx_usable") if hasattr(ops, name))
    if "amx_usable" in found and ops.amx_usable():
        found.add("amx")
    try:  # decode.cpp registers the class only where the CPU has AVX-512 VNNI and BF16; asking for a missing
        _ = torch.classes.leanlm_native.Decoder  # torch class raises RuntimeError, not AttributeError
        found.add("decoder")
    except (RuntimeError, AttributeError):
        pass
    return frozenset(found)


SWITCHES = ("LEANLM_NATIVE", "LEANLM_VNNI", "LEANLM_AMX", "LEANLM_NATIVE_ROWS", "LEANLM_NATIVE_ATTENTION",
            "LEANLM_NATIVE_FLASH", "LEANLM_BLOCKED_KEYS", "LEANLM_NATIVE_STEP", "LEANLM_WEIGHT_CACHE")


@dataclass(frozen=True)
class KernelPlan:
    """Which kernels run (module docstring); every field False is PyTorch's own ops everywhere."""

    device: str = "cpu"  # the device type the plan is for
    c_kernels: bool = False  # plain C kernels (kernels/*.c via ctypes): the untiled int8 head
    c_dense: bool = False  # prefill unpacks torch's int4 layout to dense bf16 (kernels/int4_dense.c)
    vnni_head: bool = False  # the untiled head's C kernel on VNNI (kernels/int8_vnni.c), else its fp32 loops
    int4_vnni: bool = False  # 4-8 bit weights in our VNNI layout (kernels/int4_vnni.cpp), else PyTorch's int4
    int8_head: bool = False  # the head tiled for kernels/int8_head.cpp
    amx: bool = False  # int4 products of 32 rows or more on AMX tiles (kernels/amx.cpp)
    row_ops: bool = False  # bf16 norms and gated activations (kernels/rowops.cpp)
    argmax: bool = False  # greedy choice over fp32 logits (kernels/rowops.cpp)
    attention: bool = False  # few-query attention (kernels/attention.cpp, attend_blocked.cpp)
    flash: bool = False  # prompts' bf16 attention (kernels/flash.cpp)
    int8_kv: bool = False  # an int8 K/V cache can be kept (kernels/attend_int8.cpp, cache_ops.cpp)
    blocked_keys: bool = False  # keys in blocks of 16 slots where a model fits (model/cache.py)
    native_step: bool = False  # the C++ decode step (kernels/decode.cpp) may be used
    weight_cache: bool = True  # loaded models are saved and mapped by later loads

    @classmethod
    def resolve(cls, device: torch.device | str = "cpu", env: Mapping[str, str] | None = None) -> KernelPlan:
        """The plan for `device` under the switches in `env` (default: this process's environment, read now;
        the CPU is asked once per process)."""
        env = os.environ if env is None else env
        return _resolve(torch.device(device).type, tuple(env.get(name, "1") != "0" for name in SWITCHES))

    def use_process_wide(self) -> None:
        """Apply what the kernels hold per process: AMX tiles are granted per process (kernels/amx.cpp), so the
        plan applied last decides whether int4 products of many rows take them (Transformer.apply_plan)."""
        if self.int4_vnni:
            torch.ops.leanlm_native.amx_allow(self.amx)

    def key(self) -> str:
        """A stable string of every field that chooses a layout or a route (part of on-disk keys): all but
        weight_cache."""
        return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in asdict(self).items()
                        if k != "weight_cache")

    def int8_kv_for(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str | None) -> bool:
        """Can this model keep an int8 K/V cache (model/kv_int8.py) on `device`? Decode steps attend on the
        codes (kernels/attend_int8.cpp), prompts on dequantized rows."""
        return (torch.device(device or "cpu").type == "cpu" and dtype == torch.bfloat16 and cfg.mla is None
                and cache_kernels_fit(cfg.head_dim) and cfg.attn_softcap is None and self.int8_kv)

    def blocked_keys_for(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str | None) -> bool:
        """Keep this model's keys blocked? Where our kernels do every attention (bf16, no softcap:
        kernels/attend_blocked.cpp for decode steps, flash.cpp for prompts)."""
        return (torch.device(device or "cpu").type == "cpu" and dtype == torch.bfloat16 and cfg.mla is None
                and cache_kernels_fit(cfg.head_dim) and cfg.attn_softcap is None and self.blocked_keys)



@functools.cache
def _resolve(kind: str, switches: tuple[bool, ...]) -> KernelPlan:
    """The plan for a device type and the switches' values (in SWITCHES' order: True unless set to "0")."""
    on = dict(zip(SWITCHES, switches, strict=True))
    if kind != "cpu" or not on["LEANLM_NATIVE"]:
        return KernelPlan(device=kind, weight_cache=on["LEANLM_WEIGHT_CACHE"])
    found = _probe()
    vnni, rows = on["LEANLM_VNNI"], on["LEANLM_NATIVE_ROWS"]
    attention = on["LEANLM_NATIVE_ATTENTION"] and "attend" in found
    flash = on["LEANLM_NATIVE_FLASH"] and "flash_attend" in found
    return KernelPlan(device=kind, c_kernels="c" in found, c_dense="c_dense" in found,
                      vnni_head=vnni and "c_vnni" in found,
                      int4_vnni=vnni and "int4_mm" in found, int8_head=vnni and "int8_mm" in found,
                      amx=on["LEANLM_AMX"] and "amx" in found, row_ops=rows and "rms_norm" in found,
                      argmax=rows and "rms_norm" in found and "argmax" in found, attention=attention, flash=flash,
                      int8_kv="attend_int8" in found, blocked_keys=on["LEANLM_BLOCKED_KEYS"] and attention and flash,
                      native_step=on["LEANLM_NATIVE_STEP"] and "decoder" in found,
                      weight_cache=on["LEANLM_WEIGHT_CACHE"])
