"""`leanlm distill`: train a smaller student to match a teacher's next-token distributions.

The student starts as the teacher with some of its blocks dropped (embeddings, norms and head kept, the kept
blocks copied: the initialisation DistilBERT used), so it is a working model from step 0 and distillation
repairs what the dropped blocks did. The loss is the KL divergence from the teacher's distribution to the
student's at every position of each training window, both softened by a temperature T and scaled by T^2 (so
its gradients keep their size as T changes; Hinton et al., 2015). The teacher and the student both run in
float32; the teacher never keeps gradients.

Held-out windows (the last `eval_fraction` of the text, never trained on) measure the result before and after:
the student's perplexity on the text and its KL from the teacher at T = 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.model.transformer import Transformer


@dataclass(frozen=True)
class TrainConfig:
    """How the student is trained: AdamW `steps` (warm-up, then cosine from `lr`), `batch` windows of `seq_len`
    tokens a step, both distributions softened by `temperature`; `eval_fraction` of the text is held out."""

    steps: int = 200
    lr: float = 1e-4
    temperature: float = 2.0
    batch: int = 1
    seq_len: int = 256
    eval_fraction: float = 0.1


@dataclass
class DistillReport:
    layers: list[int]  # the teacher's blocks the student kept
    params: tuple[int, int]  # teacher, student
    losses: list[float] = field(default_factory=list)  # training loss per step
    before: dict[str, float] = field(default_factory=dict)  # held-out: perplexity, kl (and the teacher's)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    path: Path | None = None

    def summary(self) -> str:
        b, a = self.before, self.after
        return (f"student: {len(self.layers)} blocks, {self.params[1] / 1e6:.1f}M parameters (teacher "
                f"{self.params[0] / 1e6:.1f}M); held-out perplexity {b['ppl']:.2f} -> {a['ppl']:.2f} "
                f"(teacher {b['teacher_ppl']:.2f}), KL from the teacher {b['kl']:.4f} -> {a['kl']:.4f} nats/token, "
                f"{len(self.losses)} steps in {self.seconds:.0f} s" + (f"; wrote {self.path}" if self.path else ""))


def keep_every(n_layers: int, keep: int) -> list[int]:
    """`keep` block indices spread evenly over n_layers, always the first and the last. E.g. 30 -> 15:
    0, 2, 4, ..., 12, 14, 17, ..., 27, 29 (i * 29 / 14 rounded, half to even: 14.5 -> 14)."""
    if not 1 <= keep <= n_layers:
        raise LeanLMError(f"the student needs between 1 and {n_layers} blocks (got {keep})")
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def init_student(teacher: Transformer, layers: list[int]) -> Transformer:
    """A float32 student with the teacher's config and only the blocks `layers` (copied, in order)."""
    cfg = teacher.cfg
    if not layers or any(not 0 <= i < cfg.n_layers for i in layers):
        raise LeanLMError(f"block indices must be within 0..{cfg.n_layers - 1}")
    scfg = replace(cfg, n_layers=len(layers), layer_windows=tuple(cfg.layer_windows[i] for i in layers))
    student = Transformer(scfg)
    state = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            if int(i) not in layers:
                continue
            k = f"layers.{layers.index(int(i))}.{rest}"
        state[k] = v.detach().float().clone()
    student.load_state_dict(state, strict=True)
    if cfg.tie_embeddings:
        student.output.weight = student.tok_embeddings.weight
    return student


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over positions; logits (..., V)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def evaluate(student: Transformer, teacher: Transformer, windows: list[torch.Tensor]) -> dict[str, float]:
    """Held-out perplexity of student and teacher (next-token, every position after the first) and the
    student's KL from the teacher at T = 1, per token."""
    nll = tnll = kl = 0.0
    n = 0
    for ids in windows:
        pos = torch.arange(ids.shape[1])[None]
        s, t = student(ids, pos)[:, :-1], teacher(ids, pos)[:, :-1]
        target = ids[:, 1:].flatten()
        nll += F.cross_entropy(s.flatten(0, 1), target, reduction="sum").item()
        tnll += F.cross_entropy(t.flatten(0, 1), target, reduction="sum").item()
        kl += kd_loss(s, t).item() * target.numel()
        n += target.numel()
    return {"ppl": math.exp(nll / n), "teacher_ppl": math.exp(tnll / n), "kl": kl / n}


def distill(teacher: Transformer, student: Transformer, train: list[torch.Tensor], held_out: list[torch.Tensor],
            config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> DistillReport:
    """Train `student` in place on windows `train` (each (1, L), cycled `config.batch` at a time) for
    `config.steps` AdamW steps with a warm-up then cosine learning rate; report before/after on `held_out`."""
    steps, batch = config.steps, config.batch
    if not train or not held_out:
        raise LeanLMError("distillation needs training and held-out windows: the text is too short")
    if steps < 1:
        raise LeanLMError("--steps must be at least 1")
    teacher.eval().requires_grad_(False)
    report = DistillReport([], (_count(teacher), _count(student)))
    report.before = evaluate(student, teacher, held_out)
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    t0 = time.perf_counter()
    student.train()
    for step in range(steps):
        ids = torch.cat([train[(step * batch + j) % len(train)] for j in range(batch)])  # (batch, L)
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        with torch.no_grad():
            target = teacher(ids, pos)
        loss = kd_loss(student(ids, pos), target, config.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        report.losses.append(loss.item())
        if on_step is not None:
            on_step(step, report.losses[-1])
    student.eval()
    report.seconds = time.perf_counter() - t0
    report.after = evaluate(student, teacher, held_out)
    return report


def _count(m: Transformer) -> int:
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def plot_losses(report: DistillReport, path: str | Path) -> None:
    """Training loss against step, with the held-out KL before and after (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(report.losses) + 1), report.losses, lw=1, label="training loss (T^2 KL at temperature T)")
    for key, style, name in (("before", ":", "held-out KL before"), ("after", "--", "held-out KL after")):
        ax.axhline(getattr(report, key)["kl"], color="k", ls=style, lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_yscale("log")
    ax.set_title(f"distilling {len(report.layers)} blocks: held-out perplexity {report.before['ppl']:.1f} -> "
                 f"{report.after['ppl']:.1f} (teacher {report.before['teacher_ppl']:.1f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def distill_checkpoint(src: str | Path, data: str | Path, out: str | Path, *, keep: int | None = None,
                       layers: list[int] | None = None, config: TrainConfig = TrainConfig(), ftype: str = "f16",
                       progress: bool = True) -> DistillReport:
    """Distill teacher checkpoint `src` (GGUF file, HF folder or registry name) into a student GGUF `out` that
    leanlm and llama.cpp load, training on the UTF-8 text file `data`. The student keeps `layers` of the
    teacher's blocks, or `keep` of them spread evenly (default: half)."""
    from tqdm import tqdm

    from leanlm.formats import load_model
    from leanlm.formats.gguf_writer import write_gguf
    from leanlm.formats.hub import resolve_model
    from leanlm.quant.calibrate import windows

    src, data, out = resolve_model(str(src), progress=progress), Path(data), Path(out)
    if not data.is_file():
        raise LeanLMError(f"no such text file: {data}")
    seq_len, eval_fraction = config.seq_len, config.eval_fraction
    if not 0 < eval_fraction < 1:
        raise LeanLMError("--eval-fraction must be between 0 and 1")
    teacher, tok = load_model(src, torch.float32)
    n = teacher.cfg.n_layers
    layers = layers if layers is not None else keep_every(n, keep if keep is not None else max(1, n // 2))
    student = init_student(teacher, layers)
    ids = tok.encode(data.read_text(encoding="utf-8"), add_bos=False)
    split = int(len(ids) * (1 - eval_fraction))
    bos = tok.bos_id if getattr(tok, "add_bos", False) else None
    train, held_out = windows(ids[:split], seq_len, split, bos), windows(ids[split:], seq_len, len(ids) - split, bos)
    bar = tqdm(total=config.steps, desc="distilling", unit="step", disable=not progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    report = distill(teacher, student, train, held_out, config, on_step)
    bar.close()
    report.layers = layers

    def tokenizer(w) -> None:  # noqa: ANN001 (gguf.GGUFWriter)
        if src.is_dir():
            from leanlm.formats.tokenizer_export import write_tokenizer

            write_tokenizer(w, src)
            return
        from leanlm.tools.quantize import _copy_metadata

        _copy_metadata(src, w, only="tokenizer.")

    tmp = out.with_name(out.name + ".partial")
    write_gguf(student, tmp, ftype, extra_metadata=tokenizer)
    tmp.replace(out)
    report.path = out
    return report
