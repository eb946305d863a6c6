"""The paper's toy: mode-seeking GAD vs mode-covering SeqKD, in pure torch (seconds on a CPU).

The teacher samples from a 3-mode distribution over ``K`` bins: a mixture of discretised
Gaussians with weights 0.6 / 0.3 / 0.1 (the top mode on one side, so the mixture's mean lies in a
valley between modes). The student is too small to represent it: one discretised Gaussian
(a learnable centre and width). Both methods learn from the same fixed set of teacher samples
(equal teacher budget) and take the same number of generator steps:

- **SeqKD**: maximum likelihood of the teacher samples (forward KL): mode-covering, the student
  spreads over every mode and the valleys between them;
- **GAD**: the paper's schedule: a SeqKD warmup (the generator's likelihood steps while the
  discriminator learns), then the GAD stage: the discriminator (one score per bin) is trained
  with the Bradley-Terry loss on (teacher sample, student sample) pairs, and the student by
  policy gradient on the discriminator's score (before its update), advantages centred within
  each group of samples (GRPO with ``norm_adv_by_std=false``, docs/algorithms.md §2.3; the
  std division made this two-parameter student drift off the modes): mode-seeking.

Reported per method (mean ± std over seeds): the student's probability mass on the top mode
(bins within ``MODE_RADIUS`` of its centre), on each mode, and in the valleys, beside the
teacher's. ``python bench/toy_modes.py [--out DIR] [--seeds N]`` writes ``toy_modes.md``,
``toy_modes.png`` and ``toy_modes.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

K = 32  # bins
CENTRES = (5.0, 16.0, 26.0)  # the modes' centres; the first is the top mode
WEIGHTS = (0.6, 0.3, 0.1)
WIDTH = 1.5  # each mode's standard deviation, in bins
MODE_RADIUS = 3  # a bin belongs to a mode when it is within this distance of the centre


@dataclass(frozen=True)
class ToyConfig:
    teacher_samples: int = 2048  # the teacher budget, shared by both methods
    steps: int = 900  # generator steps of each method
    warmup: int = 300  # GAD's SeqKD warmup steps (the paper: 1 epoch of warmup, then 2 of GAD)
    batch: int = 64  # teacher samples per likelihood step; groups per GAD step
    group: int = 8  # student samples per group (GRPO)
    lr: float = 0.05  # generator, likelihood steps (SeqKD, GAD's warmup)
    gad_lr: float = 0.02  # generator, GAD steps (smaller than SeqKD's, as in the paper)
    d_lr: float = 0.05  # discriminator


def teacher_probs() -> torch.Tensor:
    """The teacher's distribution over the K bins."""
    x = torch.arange(K, dtype=torch.float64)
    mix = torch.zeros(K, dtype=torch.float64)
    for c, w in zip(CENTRES, WEIGHTS, strict=True):
        bump = torch.exp(-0.5 * ((x - c) / WIDTH) ** 2)
        mix += w * bump / bump.sum()
    return mix


class Student(torch.nn.Module):
    """One discretised Gaussian over the bins: logits -(x - mu)^2 / (2 sigma^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(K / 2 - 0.5))
        self.log_sigma = torch.nn.Parameter(torch.tensor(2.0))

    def log_probs(self) -> torch.Tensor:
        x = torch.arange(K, dtype=torch.float32)
        logits = -0.5 * ((x - self.mu) / self.log_sigma.exp()) ** 2
        return torch.log_softmax(logits, dim=0)


def mode_masses(p: torch.Tensor) -> dict[str, float]:
    """Probability mass per mode (within MODE_RADIUS of its centre) and in the valleys."""
    x = torch.arange(K, dtype=torch.float64)
    out = {}
    covered = torch.zeros(K, dtype=torch.bool)
    for i, c in enumerate(CENTRES):
        near = (x - c).abs() <= MODE_RADIUS
        covered |= near
        out[f"mode{i + 1}"] = float(p[near].sum())
    out["valley"] = float(p[~covered].sum())
    return out


def train_seqkd(samples: torch.Tensor, cfg: ToyConfig, gen: torch.Generator) -> Student:
    """Maximum likelihood of the teacher samples, ``cfg.steps`` Adam steps on minibatches."""
    student = Student()
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    for _ in range(cfg.steps):
        sft_step(student, opt, samples, cfg.batch, gen)
    return student


def sft_step(student: Student, opt, samples: torch.Tensor, batch: int, gen) -> None:
    idx = torch.randint(len(samples), (batch,), generator=gen)
    loss = -student.log_probs()[samples[idx]].mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def d_step(d: torch.Tensor, d_opt, teacher: torch.Tensor, student: torch.Tensor) -> None:
    """One Bradley-Terry step: -log sigmoid(D(y_t) - D(y_s)) over the pairs."""
    loss = -torch.nn.functional.logsigmoid(d[teacher] - d[student]).mean()
    d_opt.zero_grad()
    loss.backward()
    d_opt.step()


def train_gad(
    samples: torch.Tensor, cfg: ToyConfig, gen: torch.Generator
) -> tuple[Student, list[float]]:
    """SeqKD warmup (D trained alongside), then GAD; returns the student and its top-mode mass
    after every step."""
    student = Student()
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    gad_opt = torch.optim.Adam(student.parameters(), lr=cfg.gad_lr)
    d = torch.zeros(K, requires_grad=True)  # one score per bin: D can represent anything
    d_opt = torch.optim.Adam([d], lr=cfg.d_lr)
    top: list[float] = []
    for step in range(cfg.steps):
        n = cfg.batch * cfg.group
        with torch.no_grad():
            y_s = torch.multinomial(student.log_probs().exp(), n, True, generator=gen)
        y_t = samples[torch.randint(len(samples), (cfg.batch,), generator=gen)]
        y_t_pairs = y_t.repeat_interleave(cfg.group)
        if step < cfg.warmup:
            d_step(d, d_opt, y_t_pairs, y_s)
            sft_step(student, opt, samples, cfg.batch, gen)
        else:
            with torch.no_grad():  # reward: D before its update
                r = d[y_s].view(cfg.batch, cfg.group)
                adv = r - r.mean(1, keepdim=True)  # GRPO without the std (norm_adv_by_std=false)
            d_step(d, d_opt, y_t_pairs, y_s)
            loss = -(adv.flatten() * student.log_probs()[y_s]).mean()
            gad_opt.zero_grad()
            loss.backward()
            gad_opt.step()
        with torch.no_grad():
            top.append(mode_masses(student.log_probs().exp().double())["mode1"])
    return student, top


def run(seeds: int, cfg: ToyConfig) -> dict:
    """Both methods per seed, from the same teacher samples."""
    teacher = teacher_probs()
    per_seed = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        samples = torch.multinomial(teacher, cfg.teacher_samples, True, generator=gen)
        seqkd = train_seqkd(samples, cfg, gen)
        gad, top_curve = train_gad(samples, cfg, gen)
        with torch.no_grad():
            probs = {
                "seqkd": seqkd.log_probs().exp().double(),
                "gad": gad.log_probs().exp().double(),
            }
        per_seed.append(
            {
                "masses": {m: mode_masses(p) for m, p in probs.items()},
                "probs": {m: p.tolist() for m, p in probs.items()},
                "gad_top_curve": top_curve,
            }
        )
    return {"teacher": mode_masses(teacher), "teacher_probs": teacher.tolist(), "seeds": per_seed}


def summary(result: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{method: {mass key: (mean, std over seeds)}}."""
    out: dict = {}
    for method in ("seqkd", "gad"):
        keys = result["seeds"][0]["masses"][method]
        vals = {k: [s["masses"][method][k] for s in result["seeds"]] for k in keys}
        out[method] = {
            k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
            for k, v in vals.items()
        }
    return out


def markdown(result: dict, cfg: ToyConfig, seconds: float) -> str:
    s = summary(result)
    t = result["teacher"]
    keys = list(t)
    lines = [
        "# Toy: mode-seeking vs mode-covering",
        "",
        f"{len(result['seeds'])} seed(s), {seconds:.1f} s. Teacher: 3 modes over {K} bins, "
        f"weights {WEIGHTS} (mode1 is the top mode); student: one discretised Gaussian. Both "
        f"methods: {cfg.steps} generator steps from the same {cfg.teacher_samples} teacher "
        f"samples; GAD = {cfg.warmup} SeqKD warmup steps, then {cfg.steps - cfg.warmup} GAD "
        f"steps ({cfg.batch} groups of {cfg.group} samples). Probability mass within "
        f"{MODE_RADIUS} bins of each mode's centre, mean ± std over seeds:",
        "",
        "| | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
        "| teacher | " + " | ".join(f"{t[k]:.2f}" for k in keys) + " |",
    ]
    for method in ("seqkd", "gad"):
        cells = [f"{s[method][k][0]:.2f} ± {s[method][k][1]:.2f}" for k in keys]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Top-mode mass per seed:", ""]
    for method in ("seqkd", "gad"):
        per = ", ".join(f"{r['masses'][method]['mode1']:.2f}" for r in result["seeds"])
        lines.append(f"- {method}: {per}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax.bar(range(K), result["teacher_probs"], color="lightgrey", label="teacher")
    for method, color in (("seqkd", "C2"), ("gad", "C0")):
        for i, s in enumerate(result["seeds"]):
            ax.plot(s["probs"][method], color=color, alpha=0.7, label=method if i == 0 else None)
    ax.set_xlabel("bin")
    ax.set_ylabel("probability")
    ax.set_title("teacher vs students (one line per seed)")
    ax.legend()
    for i, s in enumerate(result["seeds"]):
        ax2.plot(s["gad_top_curve"], color="C0", alpha=0.7, label="gad" if i == 0 else None)
    seqkd_top = [s["masses"]["seqkd"]["mode1"] for s in result["seeds"]]
    ax2.axhline(statistics.mean(seqkd_top), color="C2", label="seqkd (final)")
    ax2.axhline(result["teacher"]["mode1"], color="grey", linestyle="--", label="teacher")
    ax2.set_xlabel("generator step")
    ax2.set_ylabel("mass on the top mode")
    ax2.set_title("GAD: SeqKD warmup, then GAD")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/bench_toy_modes")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=ToyConfig.steps)
    ap.add_argument("--warmup", type=int, default=ToyConfig.warmup)
    ap.add_argument("--gad-lr", type=float, default=ToyConfig.gad_lr)
    ap.add_argument("--d-lr", type=float, default=ToyConfig.d_lr)
    args = ap.parse_args(argv)
    cfg = ToyConfig(steps=args.steps, warmup=args.warmup, gad_lr=args.gad_lr, d_lr=args.d_lr)
    torch.set_num_threads(1)
    t0 = time.time()
    result = run(args.seeds, cfg)
    seconds = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["config"] = asdict(cfg)
    (out / "toy_modes.json").write_text(json.dumps(result))
    (out / "toy_modes.md").write_text(markdown(result, cfg, seconds))
    plot(result, out / "toy_modes.png")
    print((out / "toy_modes.md").read_text())
    return summary(result)


if __name__ == "__main__":
    main()
