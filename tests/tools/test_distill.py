"""Distillation (distill.py): the student starts as the teacher's kept blocks, the loss is the KL the
definition says, training brings the student measurably closer to the teacher on text it never saw, and
`leanlm distill` writes a student GGUF that loads and answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import FIXTURES
from helpers.tiny_models import random_transformer, write_tiny_mistral

from leanlm.errors import LeanLMError
from leanlm.tools.distill import TrainConfig, distill, init_student, kd_loss, keep_every


def test_keep_every_spreads_blocks_and_keeps_both_ends() -> None:
    assert keep_every(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert keep_every(4, 4) == [0, 1, 2, 3] and keep_every(5, 1) == [0] and keep_every(5, 2) == [0, 4]
    with pytest.raises(LeanLMError):
        keep_every(4, 5)


@torch.no_grad()
def test_student_is_the_teacher_without_the_dropped_blocks() -> None:
    teacher = random_transformer((None, 4, None))
    ids, pos = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0)), torch.arange(20)[None]
    assert torch.equal(init_student(teacher, [0, 1, 2])(ids, pos), teacher(ids, pos))
    student = init_student(teacher, [0, 2])
    assert student.cfg.n_layers == 2 and student.cfg.layer_windows == (None, None)
    x = teacher.tok_embeddings(ids)  # the teacher's forward with block 1 skipped
    mask = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]
    from leanlm.model.rope import rope_tables

    rope = rope_tables(pos, teacher.cfg.head_dim, teacher.cfg.rope_base)
    for i in (0, 2):
        x = teacher.layers[i](x, rope, mask, None, None, 0)
    assert torch.allclose(student(ids, pos), teacher.output(teacher.norm(x)).float(), atol=1e-5)


def test_kd_loss_is_the_scaled_kl() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert torch.allclose(kd_loss(s, t, 2.0), want, atol=1e-6)
    assert kd_loss(t, t, 2.0).abs().item() < 1e-6


def test_distillation_brings_the_student_closer_on_held_out_text() -> None:
    torch.manual_seed(0)
    teacher = random_transformer((None, None, None), std=0.3)
    g = torch.Generator().manual_seed(2)
    text = torch.randint(0, 64, (1, 24 * 40), generator=g)  # 40 windows of 24 tokens: 32 train, 8 held out
    windows = list(text.view(40, 1, 24))
    student = init_student(teacher, [0, 2])
    r = distill(teacher, student, windows[:32], windows[32:], TrainConfig(steps=60, lr=3e-3, temperature=1.0, batch=4))
    assert len(r.losses) == 60 and r.params[1] < r.params[0]
    assert r.after["kl"] < 0.5 * r.before["kl"]  # held-out windows, never trained on
    assert abs(r.after["teacher_ppl"] - r.before["teacher_ppl"]) < 1e-6 * r.before["teacher_ppl"]  # untouched


def test_cli_writes_a_student_gguf_that_loads_and_answers(tmp_path: Path) -> None:
    import leanlm

    folder = write_tiny_mistral(tmp_path / "teacher")  # 2 blocks, with a tokenizer
    data = tmp_path / "data.txt"
    data.write_text(FIXTURES.joinpath("calibration.txt").read_text()[:6000])
    out, plot = tmp_path / "student.gguf", tmp_path / "loss.png"
    cmd = [sys.executable, "-m", "leanlm", "distill", str(folder), "--data", str(data), "--out", str(out),
           "--keep", "1", "--steps", "4", "--seq-len", "64", "--type", "f32", "--plot", str(plot)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "student: 1 blocks" in run.stdout and out.is_file() and plot.stat().st_size > 10_000
    llm = leanlm.load(str(out), dtype="float32", progress=False)
    assert llm.model.cfg.n_layers == 1
    text = "".join(llm.generate("Licensed under the Apache License", max_tokens=5, temperature=0, ignore_eos=True))
    assert llm.logits(llm.tokenizer.encode("Licensed under")).isfinite().all() and isinstance(text, str)


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    folder = write_tiny_mistral(tmp_path / "teacher")
    for extra, msg in ((["--data", str(tmp_path / "missing.txt")], "no such text file"),
                       (["--data", __file__, "--keep", "9"], "between 1 and 2 blocks"),
                       (["--data", __file__, "--layers", "0,x"], "comma-separated block indices")):
        run = subprocess.run([sys.executable, "-m", "leanlm", "distill", str(folder), "--out",
                              str(tmp_path / "s.gguf"), *extra], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and msg in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.gguf").exists()
