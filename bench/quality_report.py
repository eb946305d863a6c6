"""Tables, the five claims' verdicts and the figure of bench/quality.py (docs/quality.md).

Each verdict follows the rule docs/quality.md fixed before the first run: a per-seed paired
difference ``d`` (method A minus method B, same seed, same teacher data), its mean ``m`` and
standard error ``se`` (std over seeds / sqrt(seeds); 0 for one seed); ``m - se > 0``: A is
ahead ("yes" for the claim that says so), ``m + se < 0``: B is ahead, otherwise a tie.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

SPLITS = ("id", "ood")


def rows_of(results: list[dict]) -> list[str]:
    return list(results[0]["scores"])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """{row: {split: {metric: (mean, std over seeds)}}}, for the metrics every seed has."""
    agg: dict = {}
    for row in rows_of(results):
        agg[row] = {}
        for split in SPLITS:
            keys = set.intersection(*(set(r["scores"][row][split]) for r in results))
            agg[row][split] = {
                k: mean_std([r["scores"][row][split][k] for r in results]) for k in sorted(keys)
            }
    return agg


def stage_points(curve: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the training-step records of the second stage that hold ``key``."""
    return [(r["step"], r[key]) for r in curve if key in r and "event" not in r]


def stage_change(points: list[tuple[int, float]]) -> float | None:
    """Mean over the last third of the points minus the mean over the first third."""
    if len(points) < 2:
        return None
    third = max(1, len(points) // 3)
    vals = [v for _, v in points]
    return statistics.mean(vals[-third:]) - statistics.mean(vals[:third])


def gad_stage(curve: list[dict], warmup: int, key: str) -> list[tuple[int, float]]:
    return [(s, v) for s, v in stage_points(curve, key) if s >= warmup]


def paired(results: list[dict], fn_a, fn_b) -> tuple[float, float]:
    """(mean, standard error) over seeds of fn_a(seed result) - fn_b(seed result)."""
    d = [fn_a(r) - fn_b(r) for r in results]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return statistics.mean(d), se


def verdict(m: float, se: float) -> str:
    return "ahead" if m - se > 0 else "behind" if m + se < 0 else "tie"


def score(row: str, split: str, key: str):
    return lambda r: r["scores"][row][split][key]


def length_trend(method: str, warmup: int):
    def fn(r: dict) -> float:
        change = stage_change(gad_stage(r["curves"][method], warmup, "len_ratio"))
        return 0.0 if change is None else change

    return fn


def claims(results: list[dict], warmup: int) -> list[tuple[str, str, str]]:
    """(claim, verdict, the numbers) for the paper's five claims (rules: docs/quality.md)."""
    out = []
    if not {"gad", "seqkd"} <= set(rows_of(results)):
        return out

    def fmt(pair: tuple[float, float]) -> str:
        return f"{pair[0]:+.3f} ± {pair[1]:.3f}"

    d = paired(results, score("gad", "id", "score"), score("seqkd", "id", "score"))
    v = {"ahead": "yes", "tie": "tie (not reproduced)", "behind": "no"}[verdict(*d)]
    out.append(("1. GAD >= SeqKD in-domain (ID score)", v, f"GAD - SeqKD = {fmt(d)}"))

    d = paired(results, score("gad", "ood", "score"), score("seqkd", "ood", "score"))
    da = [
        paired(results, score(m, "ood", "accuracy"), score("before", "ood", "accuracy"))
        for m in ("gad", "seqkd")
    ]
    v = {"ahead": "yes", "tie": "tie (not reproduced)", "behind": "no"}[verdict(*d)]
    text = (
        f"OOD score GAD - SeqKD = {fmt(d)}; OOD accuracy vs before: GAD {fmt(da[0])}, "
        f"SeqKD {fmt(da[1])}"
    )
    out.append(("2. GAD keeps/improves OOD where SeqKD stalls/drops", v, text))

    f1 = paired(results, score("seqkd", "id", "f1"), score("gad", "id", "f1"))
    style = paired(results, score("gad", "id", "framed"), score("seqkd", "id", "framed"))
    ok = verdict(*f1) == "ahead" and verdict(*style) != "behind"
    text = f"ID F1 SeqKD - GAD = {fmt(f1)}; ID teacher-style share GAD - SeqKD = {fmt(style)}"
    out.append(("3. SeqKD higher n-gram F1, GAD learns the style", "yes" if ok else "no", text))

    top = paired(results, score("gad", "id", "top"), score("seqkd", "id", "top"))
    v = {"ahead": "yes", "tie": "tie (not reproduced)", "behind": "no"}[verdict(*top)]
    teacher_top = statistics.mean(r["scores"]["teacher"]["id"]["top"] for r in results)
    text = f"top-mode share GAD - SeqKD = {fmt(top)} (teacher's share {teacher_top:.2f})"
    out.append(("4. GAD mode-seeking, SeqKD mode-covering", v, text))

    if "gad_frozen_d" in rows_of(results):
        frozen = paired(results, length_trend("gad_frozen_d", warmup), lambda r: 0.0)
        diff = paired(results, length_trend("gad_frozen_d", warmup), length_trend("gad", warmup))
        ok = frozen[0] > 0.2 and verdict(*diff) == "ahead"
        text = (
            f"len_ratio change over the GAD stage: frozen D {fmt(frozen)}, frozen - co-trained "
            f"{fmt(diff)} (a blow-up: > +0.20 and ahead)"
        )
        out.append(
            ("5. frozen D reward-hacked (length), co-trained not", "yes" if ok else "no", text)
        )
    return out


def fmt_ms(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def markdown(agg: dict, results: list[dict], meta: dict) -> str:
    p = meta["preset"]
    rows = rows_of(results)
    calls = {r: statistics.mean(x["teacher_calls"].get(r, 0) for x in results) for r in rows}
    secs = {r: [x["train_s"][r] for x in results if r in x["train_s"]] for r in rows}
    comp = meta["competence"]
    lines = [
        "# Distillation quality on the synthetic testbed",
        "",
        f"`{meta['command']}`: {len(results)} seed(s), mean ± std over seeds, "
        f"{meta['minutes']:.0f} min. Student: `synthetic:student` (pre-trained in "
        f"{comp.get('pretrain_s', 0):.0f} s; greedy accuracy before distillation: "
        + ", ".join(f"{t} {a:.2f}" for t, a in comp.get("competence", {}).items())
        + f"). Schedule: {p['warmup']} warmup steps (G: SFT, D: BT) then {p['gad']} GAD "
        f"steps; SeqKD: {p['warmup'] + p['gad']} SFT steps; {p['prompts']} prompts per step, "
        f"the same {p['warmup'] * p['prompts']} teacher responses for every method. Scored on "
        f"{p['eval_n']} prompts per family. score: correct and in the teacher's style; acc: "
        "correct in any style; style: share in the teacher's style; F1: unigram F1 with the "
        "teacher's reference; len: greedy tokens / teacher's; top/minor/invalid: shares of "
        f"{p['samples']} T=1 samples per multi-modal prompt; calls: teacher responses trained on "
        "(teacher row: the eval references); "
        "train s: seconds of the method's steps (the shared warmup included).",
        "",
        "| method | calls | train s | ID score | ID acc | ID style | OOD score | OOD acc | OOD style"
        " | ID F1 | OOD F1 | ID len | ID top | ID minor | ID invalid | OOD top |",
        "|---|" + "---|" * 15,
    ]
    for row in rows:
        a, o = agg[row]["id"], agg[row]["ood"]
        cells = [a["score"], a["accuracy"], a["framed"], o["score"], o["accuracy"], o["framed"]]
        cells += [a["f1"], o["f1"], a["len_ratio"], a.get("top"), a.get("minor")]
        cells += [a.get("invalid"), o.get("top")]
        sec = f"{statistics.mean(secs[row]):.0f}" if secs[row] else "-"
        lines.append(
            f"| {row} | {calls[row]:.0f} | {sec} | " + " | ".join(fmt_ms(c) for c in cells) + " |"
        )
    for split, title in (("id", "in-domain"), ("ood", "out-of-domain (held-out families)")):
        tasks = sorted(k.split("/")[1] for k in agg[rows[0]][split] if k.startswith("acc/"))
        lines += ["", f"Per family, {title}: accuracy / teacher-style share", ""]
        lines += ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for row in rows:
            s = agg[row][split]
            cells = [f"{s[f'acc/{t}'][0]:.2f} / {s[f'framed/{t}'][0]:.2f}" for t in tasks]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", trends_text(results, p["warmup"]), "", "## The paper's claims here", ""]
    lines += ["| claim | reproduces | numbers (paired over seeds: mean ± standard error) |"]
    lines += ["|---|---|---|"]
    lines += [f"| {c} | {v} | {t} |" for c, v, t in claims(results, p["warmup"])]
    return "\n".join(lines) + "\n"


def trends_text(results: list[dict], warmup: int) -> str:
    """Per seed, the GAD-stage change (last third minus first third) of the adversarial runs."""
    keys = ("reward_mean", "len_ratio", "d_acc", "g_kl")
    lines = [
        "GAD-stage trends per seed (last third minus first third of the GAD steps; eval: the "
        "in-training greedy eval, final minus after warmup):",
        "",
        "| method | seed | reward | len ratio | d_acc | KL | eval acc | eval len |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in [m for m in rows_of(results) if m.startswith("gad")]:
        for seed, r in enumerate(results):
            curve = r["curves"][method]
            cells = [stage_change(gad_stage(curve, warmup, k)) for k in keys]
            ev = {e["event"]: e for e in curve if "eval_accuracy" in e and "event" in e}
            for k in ("eval_accuracy", "eval_len_mean"):
                ok = {"final", "after_warmup"} <= ev.keys()
                cells.append(ev["final"][k] - ev["after_warmup"][k] if ok else None)
            lines.append(
                f"| {method} | {seed} | "
                + " | ".join("-" if c is None else f"{c:+.2f}" for c in cells)
                + " |"
            )
    return "\n".join(lines)


def bars(ax, agg: dict, rows: list[str], key: str, title: str) -> None:
    for j, split in enumerate(SPLITS):
        ms = [agg[r][split].get(key, (0.0, 0.0)) for r in rows]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
        ax.bar(xs, [m for m, _ in ms], 0.38, yerr=[s for _, s in ms], label=split.upper())
    ax.set_xticks(range(len(rows)), rows, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot(agg: dict, results: list[dict], p: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(results)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    bars(axes[0, 0], agg, rows, "score", "score: correct, in the teacher's style (greedy)")
    bars(axes[0, 1], agg, rows, "accuracy", "content accuracy, any style (greedy)")
    bars(axes[0, 2], agg, rows, "framed", "teacher-style share (greedy); dots: unigram F1")
    for j, split in enumerate(SPLITS):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
        axes[0, 2].plot(xs, [agg[r][split]["f1"][0] for r in rows], "k.", markersize=9)
    ax = axes[1, 0]
    bottom = [0.0] * len(rows)
    for key in ("top", "minor", "invalid"):
        vals = [agg[r]["id"].get(key, (0.0, 0.0))[0] for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(rows)), rows, rotation=20)
    ax.set_title("in-domain multi-modal families: T=1 sample shares")
    ax.legend(fontsize=8)
    colors = {m: f"C{i}" for i, m in enumerate(r for r in rows if r not in ("before", "teacher"))}
    panels = (
        (axes[1, 1], "len_ratio", "sampled length / teacher's, per step (GAD stage shaded)"),
        (axes[1, 2], "eval_accuracy", "in-training eval: greedy ID accuracy"),
    )
    for ax, key, title in panels:
        for method, color in colors.items():
            for seed, r in enumerate(results):
                curve = r["curves"][method]
                pts = (
                    stage_points(curve, key)
                    if key != "eval_accuracy"
                    else [(e["step"], e[key]) for e in curve if key in e]
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        color=color,
                        alpha=0.8,
                        marker="." if key == "eval_accuracy" else None,
                        label=method if seed == 0 else None,
                    )
        ax.axvspan(p["warmup"], p["warmup"] + p["gad"], color="grey", alpha=0.08)
        if key == "eval_accuracy":
            ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.set_xlabel("generator step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
