"""A fast, read-only GGUF header parser with memory-mapped tensor data.

The `gguf` package's `GGUFReader` builds one numpy view per string of every array
field, which takes ~30 s on Gemma 3's 262k-token vocabulary. We parse the header
ourselves (strings arrays as plain Python lists, numeric arrays with one
`np.frombuffer`) and use the `gguf` package for its constants and quant tables.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from leanlm.errors import LeanLMError, UnsupportedError

GGUF_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows first): GGUF's dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            if itype == _STRING:
                return [self.string() for _ in range(n)]
            if itype in _NP:
                arr = np.frombuffer(self.buf, dtype=_NP[itype], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(itype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise LeanLMError(f"corrupt GGUF: unknown metadata value type {vtype}")
        return self.take(_SCALARS[vtype])


class GGUFFile:
    """Metadata dict plus memory-mapped tensors of one GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LeanLMError(f"no such model file: {self.path}")
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise LeanLMError(f"not a GGUF file (bad magic): {self.path}")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except (struct.error, ValueError, IndexError) as e:
            raise LeanLMError(f"truncated or corrupt GGUF file {self.path}: {e}") from None

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self._mm))
        cur.pos = 4
        self.version = cur.take("<I")
        if self.version not in (2, 3):
            raise UnsupportedError(f"unsupported GGUF version {self.version} in {self.path}")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}  # key -> (GGUF value type, array item type)
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.take("<I")
            item = struct.unpack_from("<I", cur.buf, cur.pos)[0] if vtype == _ARRAY else None
            self.value_types[key] = (vtype, item)
            self.metadata[key] = cur.value(vtype)
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            raw.append((name, tuple(reversed(dims)), cur.take("<I"), cur.take("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, t, off in raw:
            try:
                qtype = GGMLQuantizationType(t)
            except ValueError:
                raise UnsupportedError(f"tensor {name}: unknown GGML type {t}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(shape))
            nbytes = n // block * type_size
            start = data_start + off
            if start + nbytes > len(self._mm):
                raise LeanLMError(f"truncated GGUF file {self.path}: tensor {name} runs past the end")
            self.tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def release(self, name: str | None, start: int = 0, end: int | None = None) -> None:
        """Unmap the file pages of bytes start..end of tensor `name` (None: the header) once converted.

        Loaders copy what they read, so nothing reads those pages again; without this every page of the
        file stays resident until the map is closed, on top of the converted weights (the page cache still
        holds them). The range is widened by 256 KiB on both sides: a page fault also maps the file's
        resident neighbours, which would otherwise stay mapped. Unmapping a page read later is harmless.
        """
        if not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        if name is None:
            offset, nbytes = 0, min((t.offset for t in self.tensors.values()), default=len(self._mm))
        else:
            offset, nbytes = self.tensors[name].offset, self.tensors[name].nbytes
        around = 256 << 10
        lo = max(offset + start - around, 0) // mmap.PAGESIZE * mmap.PAGESIZE  # page-aligned start
        hi = min(offset + (nbytes if end is None else end) + around, len(self._mm))
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map (no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
