"""Aggregate judged samples into the results table (Markdown, CSV), a bar chart and JSONL.

Files written to the output directory:
- ``samples.jsonl``: one record per (model, set, item): question, reference, response, judge
  reply, score / status, overlap diagnostics and lengths;
- ``results.csv``: one row per (model, set): counts, mean judge score with its 95% CI
  (Student t, clipped to the 1-10 scale), n-gram F1, ROUGE-L, response length statistics
  (words; tokens for model rows), responses cut at ``max_new_tokens``, truncated prompts;
- ``results.md``: the score table (models x sets, ``mean [low, high]``) and the details;
- ``scores.png``: mean judge score per set and model with 95% CI error bars.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from gad_ray.eval.metrics import length_stats, mean_ci

COLUMNS = (
    "model", "set", "n", "scored", "unparseable", "failed", "score", "ci_low", "ci_high",
    "ngram_f1", "rouge_l", "words_mean", "words_median", "words_max", "tokens_mean",
    "truncated", "truncated_prompts",
)  # fmt: skip


SCALE = (1.0, 10.0)  # the judge's scale; CIs are clipped to it


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def aggregate(records: list[dict]) -> list[dict]:
    """One summary row per (model, set), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["set"]), []).append(r)
    rows = []
    for (model, name), recs in groups.items():
        scores = [r["score"] for r in recs if r["score"] is not None]
        mean, low, high = mean_ci(scores)
        low, high = max(low, SCALE[0]), min(high, SCALE[1])  # nan stays nan
        lengths = length_stats([r["words"] for r in recs if r["words"] is not None])
        tokens = [r["tokens"] for r in recs if r["tokens"] is not None]
        overlap = [r for r in recs if r["ngram_f1"] is not None]
        rows.append(
            {
                "model": model,
                "set": name,
                "n": len(recs),
                "scored": len(scores),
                "unparseable": sum(r["judge_status"] == "unparseable" for r in recs),
                "failed": sum(r["judge_status"] == "failed" for r in recs),
                "score": mean,
                "ci_low": low,
                "ci_high": high,
                "ngram_f1": _mean([r["ngram_f1"] for r in overlap]),
                "rouge_l": _mean([r["rouge_l"] for r in overlap]),
                "words_mean": lengths["mean"],
                "words_median": lengths["median"],
                "words_max": lengths["max"],
                "tokens_mean": _mean(tokens),
                "truncated": sum(r["finish_reason"] == "length" for r in recs),
                "truncated_prompts": sum(bool(r["truncated_prompt"]) for r in recs),
            }
        )
    return rows


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """The score table (models x sets) and the per-(model, set) details."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    cell = {(r["model"], r["set"]): r for r in rows}
    lines = [
        "Mean judge score (1-10) with 95% CI (Student t):",
        "",
        "| model | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    for m in models:
        cells = []
        for s in sets:
            r = cell.get((m, s))
            if r is None:
                cells.append("-")
            elif math.isnan(r["score"]):
                cells.append("n/a")  # nothing scored (see unparseable / failed)
            else:
                cells.append(f"{_fmt(r['score'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | set | n | scored | unparseable | failed | n-gram F1 | ROUGE-L | words "
        "mean / median / max | truncated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['set']} | {r['n']} | {r['scored']} | {r['unparseable']} | "
            f"{r['failed']} | {_fmt(r['ngram_f1'], 3)} | {_fmt(r['rouge_l'], 3)} | "
            f"{_fmt(r['words_mean'], 1)} / {_fmt(r['words_median'], 1)} / "
            f"{_fmt(r['words_max'], 0)} | {r['truncated']} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: Path) -> None:
    """Grouped bars: one group per set, one bar per model, 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    cell = {(r["model"], r["set"]): r for r in rows}
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(sets) * max(1, len(models)) ** 0.5), 3.5))
    for k, m in enumerate(models):
        xs, ys, errs = [], [], [[], []]
        for i, s in enumerate(sets):
            r = cell.get((m, s))
            if r is None or math.isnan(r["score"]):
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(r["score"])
            errs[0].append(r["score"] - r["ci_low"])
            errs[1].append(r["ci_high"] - r["score"])
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=m)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("judge score (1-10)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv(v: object) -> object:
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 4)
    return v


def write_report(records: list[dict], out_dir: str | Path) -> list[dict]:
    """Write samples.jsonl, results.csv, results.md and scores.png; return the summary rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    rows = aggregate(records)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv(v) for k, v in r.items()})
    (out / "results.md").write_text(markdown(rows))
    bar_chart(rows, out / "scores.png")
    return rows
