"""Per-step metrics: a live progress bar, JSONL, TensorBoard, optional W&B, and a PNG at the end."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gad_ray.config.schema import TrainerConfig, WandbConfig
from gad_ray.driver.samples import COLUMNS, samples_markdown

# Shown in the progress bar, in this order, when present.
LIVE_KEYS = ("stage", "d_acc", "d_loss", "reward_mean", "g_loss", "g_kl", "len_ratio", "s_per_step")
# Panels of the final plot: (title, metric keys, which step records). The generator's g_loss is
# an SFT (or distillation) loss in a step without a policy-gradient update and the whole PPO
# objective in one with it (g_pg_loss present): the two go to panels of their own.
PLOT_PANELS = (
    ("discriminator", ("d_loss", "d_acc"), "all"),
    ("reward", ("reward_mean", "reward_std"), "all"),
    ("D scores", ("d_teacher_score_mean", "d_student_score_mean"), "all"),
    ("generator SFT loss", ("g_loss",), "sft"),
    ("generator policy-gradient loss", ("g_pg_loss", "g_loss"), "pg"),
    ("KL to reference", ("g_kl",), "all"),
    ("response length", ("response_len_mean", "teacher_len_mean"), "all"),
    ("eval", ("eval_accuracy",), "all"),
)
WANDB_ID_FILE = "wandb_run_id"  # in the run dir: a resumed run continues the same W&B run


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
        self._wandb = open_wandb(cfg.wandb, run_dir, run_config) if cfg.wandb.project else None
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

    def log_event(
        self,
        step: int,
        event: str,
        values: Mapping[str, Any],
        samples: list[dict[str, Any]] | None = None,
    ) -> None:
        """A record outside the step sequence (an evaluation, a restart), printed too. An eval's
        ``samples`` (rows of :data:`~gad_ray.driver.samples.COLUMNS`) go in its record, to
        TensorBoard as a text table and to W&B as a table."""
        plain = {k: _plain(v) for k, v in values.items()}
        record = {"step": step, "event": event, **plain}
        if samples:
            record["samples"] = samples
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in plain.items() if isinstance(v, int | float)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
            if samples:
                self._tb.add_text(f"samples/{event}", samples_markdown(samples), step)
        if self._wandb is not None:
            logged = dict(numbers)
            if samples:
                import wandb

                rows = [[step, event, *(row[c] for c in COLUMNS)] for row in samples]
                logged["eval_samples"] = wandb.Table(columns=["step", "eval", *COLUMNS], data=rows)
            self._wandb.log(logged, step=step)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in plain.items())
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


def open_wandb(cfg: WandbConfig, run_dir: Path, run_config: Mapping[str, Any] | None) -> Any:
    """Start (or continue) the run's W&B run: its id is kept in ``<run_dir>/wandb_run_id``, so
    a resumed or restarted run logs to the same W&B run."""
    import wandb  # the wandb extra; checked at config validation

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids: [a-z0-9]
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode,
        tags=cfg.tags or None,
        config=dict(run_config or {}),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        name=run_dir.name,
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_spans(records: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """The run's stages as (name, first step, last step), in order, from its step records."""
    spans: list[tuple[str, int, int]] = []
    for r in records:
        if "event" in r or "stage" not in r:
            continue
        if spans and spans[-1][0] == r["stage"]:
            spans[-1] = (r["stage"], spans[-1][1], r["step"])
        else:
            spans.append((r["stage"], r["step"], r["step"]))
    return spans


def plot_series(
    records: list[dict[str, Any]],
) -> list[tuple[str, list[tuple[str, list[list[tuple[int, float]]]]]]]:
    """The plot's panels: (title, [(metric key, its segments)]), each segment a run of
    (step, value) points within one stage (a curve never joins two stages' values). Panels and
    keys with no values are left out."""
    panels = []
    for title, keys, which in PLOT_PANELS:
        rows = [r for r in records if _in_panel(r, which)]
        lines = []
        for key in keys:
            segments: list[list[tuple[int, float]]] = []
            stage = object()
            for r in rows:
                if not isinstance(r.get(key), int | float) or isinstance(r.get(key), bool):
                    continue
                if r.get("stage") != stage or not segments:
                    segments.append([])
                    stage = r.get("stage")
                segments[-1].append((r["step"], float(r[key])))
            if segments:
                lines.append((key, segments))
        if lines:
            panels.append((title, lines))
    return panels


def _in_panel(record: dict[str, Any], which: str) -> bool:
    if which == "all":
        return True
    if "event" in record:
        return False
    return ("g_pg_loss" in record) == (which == "pg")


def plot_metrics(jsonl: Path, out_png: Path) -> Path:
    """Plot the main curves of a run (one panel per group of metrics) to a PNG, each stage's
    boundary marked and labelled with the stage names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_figure(read_metrics(jsonl))
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def plot_figure(records: list[dict[str, Any]]) -> Any:
    """The matplotlib figure of :func:`plot_metrics`."""
    import matplotlib.pyplot as plt

    panels, spans = plot_series(records), stage_spans(records)
    steps = [r["step"] for r in records] or [0]
    pad = max(0.5, 0.02 * (max(steps) - min(steps)))
    xlim = (min(steps) - pad, max(steps) + pad)  # every panel: the whole run, stages aligned
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels, strict=False):
        for i, (key, segments) in enumerate(lines):
            color = f"C{i}"
            for j, seg in enumerate(segments):
                xs, ys = zip(*seg, strict=True)
                ax.plot(
                    xs,
                    ys,
                    color=color,
                    label=key if j == 0 else None,
                    marker="." if len(seg) < 30 else None,
                )
        for k, (name, start, _) in enumerate(spans):
            if k > 0:
                ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
            ax.text(
                start,
                1.0,
                f" {name}",
                transform=ax.get_xaxis_transform(),
                va="top",
                ha="left",
                fontsize=7,
                color="grey",
                clip_on=True,
            )
        ax.set_xlim(*xlim)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def _short(v: Any) -> Any:
    return f"{v:.3g}" if isinstance(v, float) else v
