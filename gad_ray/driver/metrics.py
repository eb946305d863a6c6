"""Per-step metrics: a live progress bar, JSONL, TensorBoard, optional W&B, and a PNG at the end."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gad_ray.config.schema import TrainerConfig

# Shown in the progress bar, in this order, when present.
LIVE_KEYS = ("stage", "d_acc", "d_loss", "reward_mean", "g_loss", "g_kl", "len_ratio", "s_per_step")
# Curves of the final plot: (title, metric keys).
PLOT_PANELS = (
    ("discriminator", ("d_loss", "d_acc")),
    ("reward", ("reward_mean", "reward_std")),
    ("D scores", ("d_teacher_score_mean", "d_student_score_mean")),
    ("generator loss", ("g_loss",)),
    ("KL to reference", ("g_kl",)),
    ("response length", ("response_len_mean", "teacher_len_mean")),
    ("eval", ("eval_accuracy",)),
)


class MetricsLogger:
    """Write one record per step to ``metrics.jsonl`` (append-only, resume-safe) and TensorBoard."""

    def __init__(
        self,
        cfg: TrainerConfig,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        run_config: Mapping[str, Any] | None = None,
        live: bool = True,
    ):
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self._truncate_after(start_step)
        self._file = self.path.open("a")
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        self._wandb = None
        if cfg.wandb.project:
            import wandb  # optional dependency: pip install wandb

            self._wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                mode=cfg.wandb.mode,
                config=dict(run_config or {}),
                dir=str(run_dir),
                resume="allow",
                name=run_dir.name,
            )
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not live,
            dynamic_ncols=True,
            desc="train",
        )

    def _truncate_after(self, start_step: int) -> None:
        """Drop records of steps >= ``start_step``: they were logged after the checkpoint we resume."""
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] < start_step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        live = {k: _short(record[k]) for k in LIVE_KEYS if k in record}
        self._bar.set_postfix(live, refresh=False)
        self._bar.update(1)

    def log_event(self, step: int, event: str, values: Mapping[str, Any]) -> None:
        """A record outside the step sequence (an evaluation, a restart), printed too."""
        record = {"step": step, "event": event, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(_plain(v), int | float):
                    self._tb.add_scalar(k, _plain(v), step)
        shown = ", ".join(f"{k}={_short(_plain(v))}" for k, v in values.items())
        self._bar.write(f"[{event} @ step {step}] {shown}")

    def status(self, text: str) -> None:
        """A live note in the progress bar (e.g. waiting for the teacher); "" clears it."""
        self._bar.set_postfix_str(text, refresh=True)

    def warn(self, step: int, event: str, values: Mapping[str, Any], text: str, tag: str) -> None:
        """A warning: an ``event`` record in metrics.jsonl, ``text`` printed above the progress
        bar, and ``tag`` kept in the bar's description."""
        record = {"step": step, "event": event, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._bar.write(f"WARNING [step {step}] {text}")
        self._bar.set_description(f"train [{tag}]", refresh=False)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(jsonl: Path, out_png: Path) -> Path:
    """Plot the main curves of a run (one panel per group of metrics) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl)
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in PLOT_PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    boundary = next((r["step"] for r in records if r.get("stage") == "gad"), None)
    if boundary is not None:
        for ax in list(axes.flat)[: len(panels)]:
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def _short(v: Any) -> Any:
    return f"{v:.3g}" if isinstance(v, float) else v
