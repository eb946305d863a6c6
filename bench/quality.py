"""Quality benchmark: undistilled student vs SeqKD vs GAD vs GAD with a frozen discriminator.

From nothing: a fresh ``tiny:small`` student and the synthetic rule-based teacher
(``gad_ray.synthetic.tasks``). Each method is trained with the real driver on the same teacher
data, then its exported student (``final/``) is loaded into one vLLM rollout group per seed
(through the same weight sync as training) and scored on

- in-domain prompts (the training tasks and lengths: copy, upper, fruit, synonym, 1-3 words),
- out-of-domain prompts: longer copy/upper prompts (4-6 words; the multi-modal tasks take no
  length, so they would only repeat the in-domain set),

by the synthetic checker: greedy accuracy per task, response length relative to the teacher
(token counts), unigram F1 with the teacher's response, and on the multi-modal tasks (fruit,
synonym) the share of T=1 samples on the teacher's most probable answer / on a valid minor
answer / invalid (mode-seeking vs mode-covering). A ``teacher`` row scores fresh teacher draws.

Equal compute = the same number of generator optimizer steps, from one shared start: per seed,
the GAD run takes ``warmup`` steps (G: SFT on the teacher; D: BT against G's samples) and saves
a checkpoint, then ``gad`` GRPO steps. SeqKD and GAD-frozen-D resume from that checkpoint:
SeqKD takes ``gad`` more SFT steps (its first ``warmup`` SFT steps are exactly GAD's warmup,
since the warmup's G update does not depend on D), GAD-frozen-D ``gad`` GRPO steps with D as
warmup left it (the paper's ablation). GAD also spends rollouts and D updates that SeqKD does
not; the table reports the seconds of each method's post-warmup steps.

Run: ``python bench/quality.py [--out outputs/bench_quality]`` (3 seeds, ~25 min on 2 cores)
or ``--quick`` (1 seed, a few steps, ~2.5 min: checks the pipeline, not the ranking); ``--set
KEY=VALUE`` (repeatable) adds a Hydra override to every training run, to try the knobs of docs/algorithms.md §3.1
(e.g. ``--set algorithm.generator_optim.lr=2e-4``). Writes ``quality.md``, ``quality.png`` and
``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import ray
from transformers import AutoModelForCausalLM

from gad_ray.config.hydra_app import compose
from gad_ray.config.schema import Config
from gad_ray.data.dataset import load_examples
from gad_ray.data.tokenize import TokenizedExample, tokenize_examples
from gad_ray.driver.driver import train
from gad_ray.driver.metrics import read_metrics
from gad_ray.driver.setup import cpus_per_actor
from gad_ray.eval.metrics import ngram_f1
from gad_ray.models.loading import load_tokenizer, resolve_model_path
from gad_ray.rollout import RolloutGroup, SamplingParams, send_weights
from gad_ray.synthetic.tasks import TASKS, check, prompt_text, score_responses, teacher_answer

METHODS = ("undistilled", "seqkd", "gad", "gad_frozen_d")
TRAIN_TASKS = "copy,upper,fruit,synonym"
OOD_TASKS = "copy,upper"
MULTIMODAL = tuple(t for t in TRAIN_TASKS.split(",") if TASKS[t].multimodal)
SCORE_MAX_TOKENS = 48  # above any teacher answer of the OOD set (truncation counts as wrong)

PRESETS: dict[str, dict[str, int]] = {
    # warmup/gad: generator optimizer steps; prompts: per step; eval_n: prompts per split;
    # samples: T=1 samples per multi-modal prompt; n_samples: GRPO group size
    "full": dict(
        seeds=3, warmup=64, gad=24, prompts=16, n_samples=2, eval_n=128, samples=8, train_n=1536
    ),
    "quick": dict(
        seeds=1, warmup=4, gad=2, prompts=8, n_samples=2, eval_n=24, samples=4, train_n=64
    ),
}


def overrides(method: str, seed: int, p: dict[str, int], extra: list[str]) -> list[str]:
    """Hydra overrides of one training run (tiny_cpu preset, quiet, few checkpoints)."""
    train_path = (
        f"synthetic:train?n={p['train_n']}&seed={seed}&tasks={TRAIN_TASKS}&min_len=1&max_len=3"
    )
    eval_path = f"synthetic:eval?n=64&seed={1000 + seed}&tasks={TRAIN_TASKS}&min_len=1&max_len=3"
    common = [
        "experiment=tiny_cpu",
        f"algorithm={method}",
        f"seed={seed}",
        f"data.train_path='{train_path}'",
        f"data.eval_path='{eval_path}'",
        f"data.prompts_per_step={p['prompts']}",
        f"algorithm.grpo.n_samples={p['n_samples']}",
        f"learner.micro_batch_size={min(16, p['prompts'])}",
        "algorithm.warmup.epochs=1000",  # the step count is set by warmup.max_steps
        "cluster.log_to_driver=false",
        "trainer.tensorboard=false",
        "trainer.keep_last=100",
        f"trainer.eval_every={max(1, p['gad'] // 4)}",
        f"trainer.save_every={p['warmup']}",  # the warmup checkpoint is the shared start
    ]
    if method == "seqkd":
        common.append(f"algorithm.warmup.max_steps={p['warmup'] + p['gad']}")
    else:
        common += [f"algorithm.warmup.max_steps={p['warmup']}", f"algorithm.gad.steps={p['gad']}"]
    return common + extra


def train_method(
    method: str, seed: int, p: dict[str, int], out: Path, extra: list[str], start: Path | None
) -> tuple[Path, Config]:
    """Train ``method`` (from ``start``, a warmup checkpoint, if given); return its run dir."""
    run_dir = out / "runs" / f"{method}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    resume = f"trainer.resume={start}" if start else "trainer.resume=never"
    cfg = compose(overrides(method, seed, p, extra) + [resume], run_dir=str(run_dir))
    return train(cfg), cfg


# ---------------------------------------------------------------------------------------------
# scoring


def eval_sets(cfg: Config, tokenizer: Any, seed: int, n: int) -> dict[str, list[TokenizedExample]]:
    """In-domain and out-of-domain prompts with teacher responses, disjoint from training."""
    specs = {
        "id": f"synthetic:test?n={n}&seed={2000 + seed}&tasks={TRAIN_TASKS}&min_len=1&max_len=3",
        "ood": f"synthetic:test?n={n}&seed={3000 + seed}&tasks={OOD_TASKS}&min_len=4&max_len=6",
    }
    data = cfg.data.model_copy(update={"max_response_length": SCORE_MAX_TOKENS})
    out = {}
    for split, spec in specs.items():
        examples, _ = load_examples(data, path=spec, require_response=True)
        out[split] = tokenize_examples(examples, tokenizer, data)[0]
    return out


def score_texts(
    examples: list[TokenizedExample],
    texts: list[str],
    lengths: list[int],
    sampled: dict[str, list[str]],
) -> dict[str, float]:
    """Flat metrics of greedy responses (+ T=1 samples of the multi-modal prompts)."""
    prompts = [e.messages for e in examples]
    scores = score_responses(prompts, texts)
    teacher_len = sum(len(e.response_ids) for e in examples) / len(examples)
    row = {
        "accuracy": scores["overall"]["accuracy"],
        "len_ratio": sum(lengths) / len(lengths) / teacher_len,
        "f1": statistics.mean(
            ngram_f1(t, e.response) for t, e in zip(texts, examples, strict=True)
        ),
    }
    row |= {f"acc/{task}": s["accuracy"] for task, s in scores["tasks"].items()}
    verdicts = [check(prompt_text(p), r) for p, rs in sampled.items() for r in rs]
    if verdicts:
        n = len(verdicts)
        row["most_probable"] = sum(v.most_probable for v in verdicts) / n
        row["valid_minor"] = sum(v.valid and not v.most_probable for v in verdicts) / n
        row["invalid"] = sum(not v.valid for v in verdicts) / n
    return row


def score_model(
    group: RolloutGroup,
    cfg: Config,
    sets: dict[str, list[TokenizedExample]],
    tokenizer: Any,
    p: dict,
) -> dict[str, dict[str, float]]:
    """Greedy + T=1 sampled generation with the rollout group's current weights; metrics per
    split."""
    out = {}
    for split, examples in sets.items():
        greedy = group.generate(
            [e.prompt_ids for e in examples], SamplingParams.greedy(SCORE_MAX_TOKENS), seed=cfg.seed
        )
        multi = [e for e in examples if e.meta.get("task") in MULTIMODAL]
        sampled: dict[str, list[str]] = {}
        if multi:
            k = p["samples"]
            samples = group.generate(
                [e.prompt_ids for e in multi],
                SamplingParams(k, 1.0, 1.0, SCORE_MAX_TOKENS),
                seed=cfg.seed,
            )
            for i, e in enumerate(multi):
                texts = [decode(tokenizer, s.token_ids) for s in samples[i * k : (i + 1) * k]]
                sampled.setdefault(prompt_text(e.messages), []).extend(texts)
        texts = [decode(tokenizer, s.token_ids) for s in greedy]
        out[split] = score_texts(examples, texts, [s.length for s in greedy], sampled)
    return out


def score_teacher(
    sets: dict[str, list[TokenizedExample]], tokenizer: Any, seed: int, k: int
) -> dict[str, dict[str, float]]:
    """The reference row: fresh T=1 draws of the teacher, scored like a student."""
    rng = random.Random(f"teacher-row-{seed}")
    out = {}
    for split, examples in sets.items():
        texts = [teacher_answer(prompt_text(e.messages), rng) for e in examples]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
        sampled: dict[str, list[str]] = {}
        for e in examples:
            if e.meta.get("task") in MULTIMODAL:
                prompt = prompt_text(e.messages)
                sampled.setdefault(prompt, []).extend(teacher_answer(prompt, rng) for _ in range(k))
        out[split] = score_texts(examples, texts, lengths, sampled)
    return out


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# the benchmark


def run_seed(seed: int, p: dict[str, int], out: Path, extra: list[str]) -> dict[str, Any]:
    """Train the three methods from one warmup, score them, the fresh student and the teacher."""
    result: dict[str, Any] = {"scores": {}, "curves": {}, "stage_s": {}}
    student = resolve_model_path("tiny:small")
    tokenizer = load_tokenizer(student)
    paths: dict[str, str] = {"undistilled": student}
    gad_dir, cfg = train_method("gad", seed, p, out, extra, start=None)
    start = gad_dir / "checkpoints" / f"step_{p['warmup']:08d}"
    run_dirs = {"gad": gad_dir}
    for method in ("seqkd", "gad_frozen_d"):
        run_dirs[method] = train_method(method, seed, p, out, extra, start)[0]
    for method, run_dir in run_dirs.items():
        paths[method] = str(run_dir / "final")
        rows = read_metrics(run_dir / "metrics.jsonl")
        result["curves"][method] = [r for r in rows if r["step"] >= p["warmup"]]
        seconds = [(r["step"], r["s_per_step"]) for r in rows if "s_per_step" in r]
        result["stage_s"][method] = sum(s for step, s in seconds if step >= p["warmup"])
        if method == "gad":  # the shared warmup ran in GAD's run only
            result["warmup_s"] = sum(s for step, s in seconds if step < p["warmup"])
    sets = eval_sets(cfg, tokenizer, seed, p["eval_n"])
    group = RolloutGroup(cfg, student, cpus_per_actor(cfg, "rollout", [("rollout",)]))  # one vLLM
    try:
        for method in METHODS:
            if method != "undistilled":  # load the trained student through the weight sync
                weights = AutoModelForCausalLM.from_pretrained(paths[method]).state_dict()
                send_weights(weights.items(), group.workers, cfg.rollout.bucket_bytes)
            result["scores"][method] = score_model(group, cfg, sets, tokenizer, p)
    finally:
        group.shutdown()
    result["scores"]["teacher"] = score_teacher(sets, tokenizer, seed, p["samples"])
    for run_dir in run_dirs.values():  # keep final/ and metrics, drop the sharded checkpoints
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """{row: {split: {metric: (mean, std over seeds)}}}."""
    agg: dict = {}
    for row in (*METHODS, "teacher"):
        agg[row] = {}
        for split in ("id", "ood"):
            keys = results[0]["scores"][row][split].keys()
            agg[row][split] = {
                k: mean_std([r["scores"][row][split][k] for r in results]) for k in keys
            }
    return agg


def fmt(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def markdown(
    agg: dict, results: list[dict], p: dict[str, int], command: str, total_min: float
) -> str:
    seeds = len(results)
    warmup_s = statistics.mean(r["warmup_s"] for r in results)
    lines = [
        "# Distillation quality on the synthetic teacher",
        "",
        f"`{command}`: {seeds} seed(s), mean ± std over seeds, {total_min:.0f} min. Equal "
        f"compute: every method gets {p['warmup'] + p['gad']} generator optimizer steps of "
        f"{p['prompts']} prompts from one shared warmup of {p['warmup']} steps (G: SFT; D: BT "
        f"vs G's samples; {warmup_s:.0f} s per seed), then {p['gad']} steps of SFT (SeqKD) or "
        f"GRPO on D's reward ({p['n_samples']} samples per prompt; GAD, GAD-frozen-D); "
        f"'stage s': seconds of those {p['gad']} steps. Scored on {p['eval_n']} in-domain prompts "
        f"({TRAIN_TASKS}, 1-3 words) and {p['eval_n']} out-of-domain prompts ({OOD_TASKS}, "
        f"4-6 words). acc: greedy accuracy; len: mean response tokens / teacher's; F1: unigram "
        f"F1 with the teacher's response; top/minor/invalid: shares of {p['samples']} T=1 samples "
        f"per multi-modal prompt ({', '.join(MULTIMODAL)}) on the teacher's most probable answer,"
        " another valid answer, an invalid one (teacher row: fresh teacher draws).",
        "",
        "| method | ID acc | OOD acc | ID len | OOD len | ID F1 | OOD F1 | top | minor | invalid"
        " | stage s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (*METHODS, "teacher"):
        a, o = agg[row]["id"], agg[row]["ood"]
        wall = [r["stage_s"][row] for r in results if row in r["stage_s"]]
        cells = [a["accuracy"], o["accuracy"], a["len_ratio"], o["len_ratio"], a["f1"], o["f1"]]
        cells += [a.get("most_probable"), a.get("valid_minor"), a.get("invalid")]
        secs = f"{statistics.mean(wall):.0f}" if wall else "-"
        lines.append(f"| {row} | " + " | ".join(fmt(c) for c in cells) + f" | {secs} |")
    tasks = sorted({k for row in agg.values() for s in row.values() for k in s if "/" in k})
    lines += ["", "Greedy accuracy per task (ID / OOD):", ""]
    lines += ["| method | " + " | ".join(t.split("/")[1] for t in tasks) + " |"]
    lines += ["|---|" + "---|" * len(tasks)]
    for row in (*METHODS, "teacher"):
        cells = [f"{fmt(agg[row]['id'].get(t))} / {fmt(agg[row]['ood'].get(t))}" for t in tasks]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", signature_text(results)]
    return "\n".join(lines) + "\n"


def stage_change(curve: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the last third of the GAD stage minus its first third."""
    pts = [r[key] for r in curve if key in r and "event" not in r]
    if len(pts) < 2:
        return None
    third = max(1, len(pts) // 3)
    return statistics.mean(pts[-third:]) - statistics.mean(pts[:third])


def signature_text(results: list[dict]) -> str:
    """The hacking signature over the GAD stage: reward up, length up, accuracy down (and, for
    the frozen D, d_acc down: the student learns to fool the warmup's D)."""
    lines = [
        "GAD-stage trends (last third minus first third of the GAD steps; eval accuracy: "
        "final minus after-warmup, in-domain eval set), per seed:",
        "",
    ]
    lines += [
        "| method | seed | reward | len ratio | d_acc | KL | eval acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("gad", "gad_frozen_d"):
        for seed, r in enumerate(results):
            curve = r["curves"][method]
            ev = {e["event"]: e["eval_accuracy"] for e in curve if "eval_accuracy" in e}
            eval_change = (
                ev["final"] - ev["after_warmup"] if {"final", "after_warmup"} <= ev.keys() else None
            )
            cells = [
                stage_change(curve, "reward_mean"),
                stage_change(curve, "len_ratio"),
                stage_change(curve, "d_acc"),
                stage_change(curve, "g_kl"),
                eval_change,
            ]
            lines.append(
                f"| {method} | {seed} | "
                + " | ".join("-" if c is None else f"{c:+.2f}" for c in cells)
                + " |"
            )
    return "\n".join(lines)


def plot(agg: dict, results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (*METHODS, "teacher")
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    ax = axes[0, 0]
    for j, split in enumerate(("id", "ood")):
        ms = [agg[r][split]["accuracy"] for r in rows]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
        ax.bar(xs, [m for m, _ in ms], 0.38, yerr=[s for _, s in ms], label=split.upper())
    ax.set_xticks(range(len(rows)), rows, rotation=20)
    ax.set_title("greedy accuracy")
    ax.legend()
    ax = axes[0, 1]
    bottom = [0.0] * len(rows)
    for key in ("most_probable", "valid_minor", "invalid"):
        vals = [agg[r]["id"].get(key, (0.0, 0.0))[0] for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(rows)), rows, rotation=20)
    ax.set_title("multi-modal tasks: T=1 sample shares")
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    for j, split in enumerate(("id", "ood")):
        ms = [agg[r][split]["len_ratio"] for r in rows]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
        ax.bar(xs, [m for m, _ in ms], 0.38, yerr=[s for _, s in ms], label=split.upper())
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(rows)), rows, rotation=20)
    ax.set_title("response length / teacher's")
    ax.legend()
    panels = (("reward_mean", "D reward (GAD stage)"), ("len_ratio", "sample length / teacher's"))
    for ax, (key, title) in zip(axes[1, :2], panels, strict=True):
        for method, color in (("gad", "C0"), ("gad_frozen_d", "C3")):
            for seed, r in enumerate(results):
                pts = [(c["step"], c[key]) for c in r["curves"][method] if key in c]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        color=color,
                        alpha=0.8,
                        label=method if seed == 0 else None,
                    )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ax = axes[1, 2]
    for method, color in (("gad", "C0"), ("gad_frozen_d", "C3"), ("seqkd", "C2")):
        for seed, r in enumerate(results):
            pts = [
                (c["step"], c["eval_accuracy"]) for c in r["curves"][method] if "eval_accuracy" in c
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    color=color,
                    marker=".",
                    label=method if seed == 0 else None,
                )
    ax.set_title("eval accuracy (ID, greedy) from the end of warmup")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/bench_quality", help="output directory")
    ap.add_argument("--quick", action="store_true", help="1 seed, a few steps (< 5 min)")
    ap.add_argument("--seeds", type=int, default=None, help="override the preset's seed count")
    ap.add_argument("--warmup", type=int, default=None, help="override the warmup steps")
    ap.add_argument("--gad", type=int, default=None, help="override the GAD-stage steps")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override added to every training run (repeatable)",
    )
    args = ap.parse_args(argv)
    p = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("seeds", "warmup", "gad"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python bench/quality.py"]
        + (["--quick"] if args.quick else [])
        + [f"--{k} {getattr(args, k)}" for k in ("seeds", "warmup", "gad") if getattr(args, k)]
        + [f"--set {o}" for o in args.set]
    )
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    results = []
    for seed in range(p["seeds"]):
        results.append(run_seed(seed, p, out, args.set))
        agg = aggregate(results)  # the tables so far, after every seed
        (out / "results.json").write_text(json.dumps({"preset": p, "results": results}))
        minutes = (time.time() - t0) / 60
        (out / "quality.md").write_text(markdown(agg, results, p, command, minutes))
        plot(agg, results, out / "quality.png")
        print(f"seed {seed} done at {time.time() - t0:.0f} s", flush=True)
    print((out / "quality.md").read_text())
    return aggregate(results)


if __name__ == "__main__":
    main()
