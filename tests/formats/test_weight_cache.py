"""The loaded-model cache (weight_cache.py): later loads map the saved model and compute exactly the same."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import leanlm
from leanlm.formats import weight_cache
from leanlm.kernels.plan import KernelPlan


@pytest.fixture()
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LEANLM_HOME", str(tmp_path))
    monkeypatch.setenv("LEANLM_WEIGHT_CACHE", "1")
    return tmp_path


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see mappings")
def test_second_load_maps_the_saved_model_and_computes_the_same(smol_path: Path, cache_home: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [1, 504, 3458, 314, 4352, 314]
    first = leanlm.load(smol_path, progress=False, compile="off")
    entry = weight_cache.entry(smol_path, torch.bfloat16, KernelPlan.resolve())
    assert entry.exists() and entry.parent == cache_home / "weights"
    again = leanlm.load(smol_path, progress=False, compile="off")
    assert _mapped(entry)  # buffers are views of the file, not a second copy in the heap
    monkeypatch.setenv("LEANLM_WEIGHT_CACHE", "0")
    fresh = leanlm.load(smol_path, progress=False, compile="off")  # repacked from the GGUF file
    ref = fresh.logits(ids)
    assert torch.equal(first.logits(ids), ref) and torch.equal(again.logits(ids), ref)
    # the saved tokenizer rebuilds its BPE from the merges it kept: every merge rank must survive
    text = "Hello world! Tokenizers' merges: 12345 naïve café, déjà vu — 東京 <|im_start|>user\n  indented"
    assert again.tokenizer.encode(text, special=True) == fresh.tokenizer.encode(text, special=True)
    assert list(again.generate("The capital of France is", max_tokens=8, temperature=0)) == \
        list(fresh.generate("The capital of France is", max_tokens=8, temperature=0))


def test_entry_follows_the_file_and_ignores_damage(smol_path: Path, cache_home: Path) -> None:
    plan = KernelPlan.resolve()
    copy = cache_home / "model.gguf"
    shutil.copyfile(smol_path, copy)
    entry = weight_cache.entry(copy, torch.bfloat16, plan)
    assert entry != weight_cache.entry(copy, torch.float16, plan)
    assert entry != weight_cache.entry(copy, torch.bfloat16, replace(plan, int4_vnni=not plan.int4_vnni))
    entry.parent.mkdir(parents=True)
    stale, other_dtype = entry, weight_cache.entry(copy, torch.float16, plan)
    stale.write_bytes(b"an entry of the file before it changed")
    other_dtype.write_bytes(b"an entry for another dtype")
    os.utime(copy, ns=(1, 1))  # a rewritten file (new modification time) is another entry
    assert weight_cache.entry(copy, torch.bfloat16, plan) != entry
    entry = weight_cache.entry(copy, torch.bfloat16, plan)
    entry.write_bytes(b"not a saved model")
    assert weight_cache.load(copy, torch.bfloat16, plan) is None
    llm = leanlm.load(copy, progress=False, compile="off")  # loads the GGUF again and rewrites the entry
    assert weight_cache.load(copy, torch.bfloat16, plan) is not None
    assert not stale.exists() and other_dtype.exists()  # the replaced entry is gone, another dtype's stays
    assert llm.tokenizer.encode("Hi") == weight_cache.load(copy, torch.bfloat16, plan)[1].encode("Hi")


def test_saved_tensors_come_back_as_views_of_one_mapping(smol_path: Path, cache_home: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry format: views with offsets and strides, storages shared by several tensors (tied weights),
    parameters, empty tensors and other dtypes come back equal, still shared, from the mapped file."""
    base = torch.arange(96, dtype=torch.float32)
    tied = torch.randint(0, 255, (16, 8), dtype=torch.uint8)
    obj = {"view": base[10:40].view(5, 6)[:, 1:4], "whole": base, "tied": tied, "tied_too": tied.t(),
           "param": torch.nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16), requires_grad=False),
           "empty": torch.empty(0, 7), "bools": torch.tensor([True, False, True])}
    where = cache_home / "entry.lwc"
    monkeypatch.setattr(weight_cache, "entry", lambda path, dtype, plan: where)
    monkeypatch.setattr(weight_cache, "Transformer", dict)  # the round trip of a plain dict, not a model
    plan = KernelPlan.resolve()
    assert weight_cache.save(obj, "tok", smol_path, torch.bfloat16, plan) == where
    got, tok = weight_cache.load(smol_path, torch.bfloat16, plan)
    assert tok == "tok" and got.keys() == obj.keys() and isinstance(got["param"], torch.nn.Parameter)
    for k, v in obj.items():
        assert got[k].dtype == v.dtype and got[k].stride() == v.stride() and torch.equal(got[k], v), k
    assert got["view"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()
    assert got["tied_too"].data_ptr() == got["tied"].data_ptr() and _mapped(where)
