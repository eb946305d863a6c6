"""Pipelining the GAD step: sync vs D || G vs one-step-off, measured on CPU, projected for 7B.

Measured: a few GAD steps of the ``tiny_cpu`` preset (``tiny:small`` student, vLLM-CPU rollout,
FSDP2 learners over gloo), once per mode, with each role's actor processes pinned to their own
cores (``--rollout-cores``, ``--g-cores``, ``--d-cores``; every thread of the process):

    sync          generate -> score -> D update -> G update, in turn; weight sync before generate
    overlap_d_g   the same, D's and G's updates at the same time (trainer.overlap_d_g=true)
    one_step_off  + the next step's generation runs while this step trains (trainer.pipeline)

For each mode: median per-phase seconds over the GAD steps, the step time, and its ratio to the
critical path ``max(rollout, learners)`` with rollout = generate + weight sync and learners =
score + the D and G updates (their max when D and G have cores of their own, else their sum).

Projected: the same pipeline model (the formulas in :func:`project`) fed with the phase seconds
of the 7B recipe on GPUs (:data:`SEVEN_B`, with their inputs stated there: a FLOP and decode
model, not a measurement).

Run: ``python bench/pipeline.py`` (~6 min on 2 cores). ``--steps``, ``--set KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

MODES = {
    "sync": ["trainer.overlap_d_g=false", "trainer.pipeline=sync"],
    "overlap_d_g": ["trainer.overlap_d_g=true", "trainer.pipeline=sync"],
    "one_step_off": ["trainer.overlap_d_g=true", "trainer.pipeline=one_step_off"],
}
PHASES = ("generate", "wait_rollout", "weight_sync", "score", "d_update", "g_update")


def pin(actor: Any, cores: list[int]) -> None:
    """Pin every thread of ``actor``'s process to ``cores`` and run torch on that many threads."""
    import ray

    def apply(self: Any, cores: list[int]) -> None:
        import torch

        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cores)
        torch.set_num_threads(len(cores))

    ray.get(actor.__ray_call__.remote(apply, cores))


def run_mode(mode: str, args: argparse.Namespace) -> list[dict]:
    from gad_ray.config.hydra_app import compose
    from gad_ray.driver.driver import Driver
    from gad_ray.driver.metrics import read_metrics

    run_dir = Path(args.out) / mode
    overrides = [
        "experiment=tiny_cpu",
        "data.eval_path=null",
        "algorithm.warmup.max_steps=1",
        f"algorithm.gad.steps={args.steps}",
        "trainer.resume=never",
        "trainer.save_every=1000",
        "trainer.tensorboard=false",
        "cluster.log_to_driver=false",
        f"trainer.run_dir={run_dir}",
        *MODES[mode],
        *args.set,
    ]
    driver = Driver(compose(overrides))
    try:
        cores = {"rollout": args.rollout_cores, "generator": args.g_cores}
        cores["discriminator"] = args.d_cores
        for role, which in cores.items():
            for actor in driver.roles[role].workers:
                pin(actor, which)
        driver.fit()
    finally:
        driver.shutdown()
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "gad"]
    return rows[args.skip :]


def summarize(rows: list[dict], separate_d_g: bool) -> dict[str, float]:
    """Median phase seconds, the step time, the critical path and their ratio."""
    med = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in rows) for p in PHASES}
    med["step"] = statistics.median(r["s_per_step"] for r in rows)
    rollout = med["generate"] + med["weight_sync"]
    updates = (max if separate_d_g else sum)((med["d_update"], med["g_update"]))
    med["critical"] = max(rollout, med["score"] + updates)
    med["ratio"] = med["step"] / med["critical"]
    return med


def project(p: dict[str, float], mode: str, separate_d_g: bool = True) -> float:
    """Step seconds of a pipeline mode from phase seconds ``p`` (generate, weight_sync, score,
    d_update, g_update): the model the measured table checks, applied to other proportions."""
    updates = (max if separate_d_g and mode != "sync" else sum)((p["d_update"], p["g_update"]))
    learners = p["score"] + updates
    if mode == "one_step_off":  # generation hides behind training; the sync blocks both
        return max(p["generate"], learners) + p["weight_sync"]
    return p["generate"] + p["weight_sync"] + learners


# The 7B recipe on one 8-GPU node, disaggregated (rollout on 2 GPUs, G on 4, D on 2, so the
# phases can overlap; the shipped preset is colocated, where they cannot). All inputs are
# assumptions, not measurements: per step 256 prompts x 8 samples, mean prompt 256 and response
# 600 tokens (T = 2048 x 856 tokens; D also sees the 256 teacher rows); N = 7.6B parameters;
# learners at 40% MFU of an H100's 989 dense bf16 TFLOP/s; a GRPO step 10 N T FLOPs (6 train,
# 2 gradient-checkpointing recompute, 2 reference forward); D's reward pass 2 N T and its BT
# step 10 N T_d (2 no-grad pass + 6 train + 2 recompute); vLLM decoding 10,000 tokens/s per GPU
# (a 7B model, ~1000 sequences in flight); a bf16 weight sync of 15 GB in ~5 s.
def _seven_b() -> dict[str, float]:
    n, t, t_d = 7.6e9, 2048 * 856, 2048 * 856 + 256 * 856
    flops = lambda gpus: gpus * 989e12 * 0.40  # noqa: E731
    return {
        "generate": 2048 * 600 / (2 * 10_000),
        "weight_sync": 5.0,
        "score": 2 * n * t / flops(2),
        "d_update": 10 * n * t_d / flops(2),
        "g_update": 10 * n * t / flops(4),
    }


SEVEN_B = _seven_b()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="GAD steps per mode")
    ap.add_argument("--skip", type=int, default=2, help="GAD steps left out (warm-up)")
    ap.add_argument("--rollout-cores", type=int, nargs="+", default=[0])
    ap.add_argument("--g-cores", type=int, nargs="+", default=[1])
    ap.add_argument("--d-cores", type=int, nargs="+", default=[1])
    ap.add_argument("--out", default="outputs/bench_pipeline")
    ap.add_argument("--set", action="append", default=[], help="a Hydra override, repeatable")
    args = ap.parse_args()

    import ray

    separate = not set(args.g_cores) & set(args.d_cores)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        results = {mode: summarize(run_mode(mode, args), separate) for mode in MODES}
    finally:
        ray.shutdown()
    print(
        f"\ncores: rollout {args.rollout_cores}, G {args.g_cores}, D {args.d_cores}; "
        f"median of {args.steps - args.skip} GAD steps (seconds)\n"
    )
    cols = (*PHASES, "step", "critical", "ratio")
    print("| mode | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for mode, r in results.items():
        print(f"| {mode} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    sync = results["sync"]
    print(
        "\nthe pipeline model on these phase times (project): "
        + ", ".join(f"{m} {project(sync, m, separate):.2f} s" for m in MODES)
    )
    print("\nprojection for the 7B recipe, disaggregated on GPUs (inputs in bench/pipeline.py):")
    print("| phase | " + " | ".join(SEVEN_B) + " |")
    print("|---|" + "---:|" * len(SEVEN_B))
    print("| seconds | " + " | ".join(f"{v:.1f}" for v in SEVEN_B.values()) + " |")
    base = project(SEVEN_B, "sync")
    print("\n| mode | step s | vs sync |\n|---|---:|---:|")
    for m in MODES:
        print(f"| {m} | {project(SEVEN_B, m):.1f} | {project(SEVEN_B, m) / base:.2f} |")


if __name__ == "__main__":
    main()
