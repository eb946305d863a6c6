"""Distillation quality on the synthetic testbed (docs/quality.md): does GAD beat SeqKD?

The paper's conditions at CPU scale: a competent pre-trained student (``synthetic:student``,
:mod:`gad_ray.synthetic.student`) and a teacher that differs from it in style and preferences
(the OpenAI-compatible synthetic server with ``style=framed``: answers framed as
``Answer: ... .``, several valid answers with unequal probabilities on the multi-modal
families, always correct where the student is not). Per seed:

1. the teacher answers ``warmup x prompts`` training prompts of the in-domain families, fetched
   once through the real fetcher and ``openai`` client: every method trains on these same
   responses (equal teacher budget);
2. GAD runs the paper's schedule with the real driver: ``warmup`` steps (G: SFT on the teacher,
   D: Bradley-Terry against G's samples; one epoch of the teacher data), then ``gad`` GRPO steps
   on D's reward (two more epochs); its warmup checkpoint is the shared start of every other
   method (:data:`METHODS`): SeqKD takes ``gad`` more SFT steps (the same generator steps in
   all), GAD-frozen-D ``gad`` GRPO steps with D frozen as warmup left it, OPD ``gad``
   on-policy distillation steps from the white-box ``synthetic:teacher`` (docs/algorithms.md §7;
   it sees the teacher's log-probs, not only its text: a reference row);
3. every final student, the pre-trained one (``before``) and fresh teacher draws (``teacher``)
   are scored by the synthetic checker on in-domain prompts and on held-out families the
   student learnt in pre-training but that distillation never shows (out of domain).

``python bench/quality.py`` (3 seeds; ``--quick``: 1 seed, a few steps: checks the pipeline and
the student's competence, not the ranking) writes ``quality.md``, ``quality.png`` and
``results.json`` into ``--out`` (default ``bench/results``). ``--set KEY=VALUE`` (repeatable)
adds a Hydra override to every training run (an ablation; SeqKD gets it too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/quality.py` from anywhere imports bench.*
    sys.path.insert(0, str(ROOT))

from bench.quality_report import aggregate, markdown, plot  # noqa: E402
from bench.quality_score import Scorer, score_teacher  # noqa: E402
from gad_ray.driver.driver import train  # noqa: E402
from gad_ray.driver.metrics import read_metrics  # noqa: E402
from gad_ray.hydra_app import compose  # noqa: E402
from gad_ray.models.loading import resolve_model_path  # noqa: E402
from gad_ray.synthetic.server import start_server_thread  # noqa: E402
from gad_ray.synthetic.student import (  # noqa: E402
    HELD_OUT_TASKS,
    IN_DOMAIN_TASKS,
    MAX_LEN,
    MIN_LEN,
    read_competence,
)
from gad_ray.synthetic.tasks import make_prompt, write_dataset  # noqa: E402
from gad_ray.teacher.cli import fetch_dataset  # noqa: E402

STUDENT = "synthetic:student"
TEACHER_STYLE = "framed"
KEY_ENV = "GAD_BENCH_TEACHER_KEY"
# The testbed's training settings: gad_ray/conf/experiment/quality_cpu.yaml (docs/quality.md).
TESTBED = ("experiment=quality_cpu", f"model.student.path={STUDENT}")

PRESETS: dict[str, dict[str, int]] = {
    # warmup / gad: generator steps of the two stages; prompts: per step; eval_n: prompts per
    # family and split; samples: T=1 samples per multi-modal prompt
    "full": dict(seeds=3, warmup=32, gad=32, prompts=16, eval_n=32, samples=8),
    "quick": dict(seeds=1, warmup=2, gad=2, prompts=8, eval_n=6, samples=2),
}


def sft_steps(p: dict[str, int]) -> list[str]:
    """Every generator step in the SFT stage (SeqKD: the warmup stage with no D)."""
    return [f"algorithm.warmup.max_steps={p['warmup'] + p['gad']}"]


def two_stage_steps(p: dict[str, int]) -> list[str]:
    """``warmup`` steps, then ``gad`` steps of the second stage."""
    return [f"algorithm.warmup.max_steps={p['warmup']}", f"algorithm.gad.steps={p['gad']}"]


def opd_steps(p: dict[str, int]) -> list[str]:
    """On-policy distillation's steps counted from the start, so that resumed at the warmup
    checkpoint it takes ``gad`` on-policy steps from the white-box ``synthetic:teacher``."""
    return [f"algorithm.opd.steps={p['warmup'] + p['gad']}"]


@dataclass(frozen=True)
class Method:
    """One trained row of the table: a Hydra ``algorithm``, its step overrides and whether it
    resumes from GAD's warmup checkpoint (the shared start) or runs from the student."""

    name: str
    algorithm: str
    steps: Callable[[dict[str, int]], list[str]]
    from_warmup: bool = True
    overrides: tuple[str, ...] = ()


# GAD first: its warmup checkpoint is where the others start. A new row is one more entry.
METHODS: tuple[Method, ...] = (
    Method("gad", "gad", two_stage_steps, from_warmup=False),
    Method("seqkd", "seqkd", sft_steps),
    Method("gad_frozen_d", "gad_frozen_d", two_stage_steps),
    Method("opd", "opd", opd_steps),  # a white-box teacher: a reference row, not black-box
)


def write_prompts(path: Path, tasks: tuple[str, ...], n: int, seed: str) -> Path:
    """``n`` prompts (no responses) drawn evenly over ``tasks``, lengths MIN_LEN..MAX_LEN."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        prompt = make_prompt(task, rng, rng.randint(MIN_LEN, MAX_LEN))
        rows.append(
            {
                "id": f"{seed}-{i:05d}",
                "task": task,
                "content": [{"role": "user", "content": prompt}],
            }
        )
    rng.shuffle(rows)
    return write_dataset(path, rows)


def fetch(server: Any, out: Path, src: Path) -> tuple[Path, int, int]:
    """The teacher's responses to the prompts of ``src`` (through ``gad_ray.teacher``): the
    file, the number of responses and the number of HTTP requests (a prompt that repeats gets
    its samples in one request with ``n`` > 1)."""
    before = server.stats()["total_requests"]
    cfg = compose(
        [
            "teacher=api",
            f"teacher.api.base_url={server.base_url}",
            "teacher.api.model=synthetic-teacher",
            f"teacher.api.api_key_env={KEY_ENV}",
            f"teacher.api.cache_path={out / 'teacher_cache.sqlite'}",
            "teacher.api.max_tokens=48",
            "teacher.api.concurrency=1",  # in order: the seeded server gives a rerun the same data
            f"model.student.path={STUDENT}",
        ],
        run_dir=str(out / "fetch"),
    )
    dst = src.with_name(src.stem + ".teacher.jsonl")
    summary = fetch_dataset(cfg, str(src), dst)
    if summary["failed"] or summary["written"] != summary["rows"]:
        raise RuntimeError(f"the teacher did not answer every prompt of {src}: {summary}")
    return dst, summary["written"], server.stats()["total_requests"] - before


def overrides(method: Method, seed: int, p: dict, data: dict[str, Path], extra: list[str]):
    """Hydra overrides of one training run."""
    return [
        *TESTBED,
        f"algorithm={method.algorithm}",
        f"seed={seed}",
        f"data.train_path={data['train']}",
        f"data.eval_path={data['id']}",
        f"data.prompts_per_step={p['prompts']}",
        f"learner.micro_batch_size={min(16, p['prompts'])}",
        "algorithm.warmup.epochs=1000",  # the step count is set by warmup.max_steps
        "cluster.log_to_driver=false",
        "trainer.tensorboard=false",
        "trainer.keep_last=100",
        f"trainer.eval_every={max(1, p['gad'] // 4)}",
        f"trainer.save_every={p['warmup']}",  # the warmup checkpoint is the shared start
        *method.steps(p),
        *method.overrides,
        *extra,
    ]


def train_method(
    method: Method, seed: int, p: dict, out: Path, data: dict[str, Path], extra: list[str]
) -> Path:
    """Train ``method``; return its run dir (``final/`` is the student, ``metrics.jsonl``)."""
    run_dir = out / "runs" / f"{method.name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = out / "runs" / f"gad-s{seed}" / "checkpoints" / f"step_{p['warmup']:08d}"
    resume = f"trainer.resume={start}" if method.from_warmup else "trainer.resume=never"
    cfg = compose(overrides(method, seed, p, data, extra) + [resume], run_dir=str(run_dir))
    return train(cfg)


def run_seed(seed: int, p: dict, out: Path, server: Any, extra: list[str]) -> dict[str, Any]:
    """Fetch the teacher data, train every method, score them, the student and the teacher."""
    data_dir = out / "data"
    n_train = p["warmup"] * p["prompts"]  # one epoch is the warmup (the paper's schedule)
    prompts = {
        "train": write_prompts(
            data_dir / f"train-s{seed}.jsonl", IN_DOMAIN_TASKS, n_train, f"train-{seed}"
        ),
        "id": write_prompts(
            data_dir / f"id-s{seed}.jsonl",
            IN_DOMAIN_TASKS,
            p["eval_n"] * len(IN_DOMAIN_TASKS),
            f"id-{seed}",
        ),
        "ood": write_prompts(
            data_dir / f"ood-s{seed}.jsonl",
            HELD_OUT_TASKS,
            p["eval_n"] * len(HELD_OUT_TASKS),
            f"ood-{seed}",
        ),
    }
    data, calls, requests = {}, {}, {}
    for split, path in prompts.items():
        data[split], calls[split], requests[split] = fetch(server, out, path)
    result: dict[str, Any] = {"scores": {}, "curves": {}, "train_s": {}, "teacher_calls": {}}
    result["server_requests"] = requests
    steps_s: dict[str, dict[int, float]] = {}
    for method in METHODS:
        run_dir = train_method(method, seed, p, out, data, extra)
        rows = read_metrics(run_dir / "metrics.jsonl")
        steps_s[method.name] = {r["step"]: r["s_per_step"] for r in rows if "s_per_step" in r}
        result["curves"][method.name] = rows
    warmup_s = sum(s for step, s in steps_s["gad"].items() if step < p["warmup"])
    for method in METHODS:  # a resumed method also paid for the shared warmup
        own = sum(steps_s[method.name].values())
        result["train_s"][method.name] = own + (warmup_s if method.from_warmup else 0.0)
        result["teacher_calls"][method.name] = calls["train"]
    result["warmup_s"] = warmup_s
    student = resolve_model_path(STUDENT)
    cfg = compose(overrides(METHODS[0], seed, p, data, extra), run_dir=str(out / "runs" / "score"))
    with Scorer(cfg, student, data, p["samples"]) as scorer:
        result["scores"]["before"] = scorer.score(None)
        for method in METHODS:
            result["scores"][method.name] = scorer.score(
                out / "runs" / f"{method.name}-s{seed}" / "final"
            )
        sets = scorer.sets
    result["scores"]["teacher"] = score_teacher(
        sets, scorer.tokenizer, seed, p["samples"], TEACHER_STYLE
    )
    result["teacher_calls"]["teacher"] = calls["id"] + calls["ood"]
    for method in METHODS:  # keep final/ and the metrics, drop the sharded checkpoints
        shutil.rmtree(out / "runs" / f"{method.name}-s{seed}" / "checkpoints", ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=str(ROOT / "bench" / "results"), help="the table, figure and results.json"
    )
    ap.add_argument(
        "--work", default="outputs/bench_quality", help="runs, teacher data and caches (large)"
    )
    ap.add_argument("--quick", action="store_true", help="1 seed, a few steps (the CI check)")
    ap.add_argument("--seeds", type=int, default=None, help="override the preset's seed count")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override added to every training run (repeatable)",
    )
    args = ap.parse_args(argv)
    p = dict(PRESETS["quick" if args.quick else "full"])
    if args.seeds is not None:
        p["seeds"] = args.seeds
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    command = " ".join(
        ["python bench/quality.py"]
        + (["--quick"] if args.quick else [])
        + ([f"--seeds {args.seeds}"] if args.seeds is not None else [])
        + [f"--set {o}" for o in args.set]
    )
    t0 = time.time()
    student = resolve_model_path(STUDENT)  # built here (pre-training) when not cached
    build_s = time.time() - t0
    competence = read_competence(student)
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    os.environ[KEY_ENV] = secrets.token_hex(16)
    results: list[dict] = []
    with start_server_thread(api_key=os.environ[KEY_ENV], style=TEACHER_STYLE) as server:
        for seed in range(p["seeds"]):
            results.append(run_seed(seed, p, work, server, args.set))
            minutes = (time.time() - t0 - build_s) / 60
            agg = aggregate(results)  # the tables so far, after every seed
            meta = {"preset": p, "command": command, "minutes": minutes, "competence": competence}
            (out / "results.json").write_text(json.dumps({**meta, "results": results}))
            (out / "quality.md").write_text(markdown(agg, results, meta))
            plot(agg, results, p, out / "quality.png")
            print(f"seed {seed} done at {time.time() - t0:.0f} s", flush=True)
    print((out / "quality.md").read_text())
    return results


if __name__ == "__main__":
    main()
