"""`pip install leanlm` into a clean venv is enough to load a Hugging Face folder and generate.

Slow (a venv, torch from the local wheel, a non-editable install): run with `-m slow`. It catches runtime
imports that only a test or bench extra provides (safetensors was one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny_tokenizer import write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from; everything else in the tree (tests, bench, .git) stays behind.
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "leanlm")

SCRIPT = """
import sys
from pathlib import Path
import leanlm
print(leanlm.__file__)
assert sorted((Path(leanlm.__file__).parent / "kernels").glob("*.cpp")), "the kernel sources were not installed"
llm = leanlm.load(sys.argv[1], dtype="float32", progress=False, compile="off")
ids = llm.encode_prompt("hello world")
text = "".join(llm.generate("hello world", max_tokens=4, temperature=0.0))
print("GENERATED", len(ids), repr(text))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _write_tiny_llama(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    write_tiny_tokenizer(folder, kind="bytelevel", vocab_size=512)


@pytest.mark.slow
def test_clean_install_loads_a_hf_folder_and_generates(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    folder = tmp_path / "tiny-llama"
    _write_tiny_llama(folder)

    # no PYTHONPATH or virtualenv of ours may leak into the child: it must import the installed copy. Our kernels
    # stay off (LEANLM_NATIVE=0): building them for a new torch path takes minutes, and the PyTorch paths load
    # the same model; that their sources were installed is checked instead.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["LEANLM_NATIVE"] = "0"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, env)  # the CPU wheel on disk
    _run([python, "-m", "pip", "install", "-q", str(src)], tmp_path, env)

    clean = tmp_path / "cwd"
    clean.mkdir()
    (clean / "check.py").write_text(SCRIPT)
    out = _run([python, "check.py", str(folder)], clean, env).stdout.splitlines()
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=env, cwd=clean, check=True).stdout.strip()
    assert Path(out[0]).resolve().is_relative_to(Path(site).resolve()), out[0]
    generated = [line for line in out if line.startswith("GENERATED")]
    assert generated and int(generated[0].split()[1]) > 0, out
