"""Pipelining the GAD step: sync vs D || G vs one-step-off, measured on CPU, projected for 7B.

Measured: a few GAD steps of the ``tiny_cpu`` preset (``tiny:small`` student, vLLM-CPU rollout,
FSDP2 learners over gloo), once per mode, with each role's actor processes pinned to their own
cores (``--rollout-cores``, ``--g-cores``, ``--d-cores``; every thread of the process):

    sync          generate -> score -> D update -> G update, in turn; weight sync before generate
    overlap_d_g   the same, D's and G's updates at the same time (trainer.overlap_d_g=true)
    one_step_off  + the next step's generation runs while this step trains (trainer.pipeline)

For each mode: median per-phase seconds over the GAD steps, the step time, and its ratio to the
step's critical path ``max(rollout, learners)`` (:func:`critical_path`, from the phase times as
that step measured them: phases that overlap on shared cores each take longer, and the modes
sample different responses, so their lengths and step times differ).

Projected: the same pipeline model (the formulas in :func:`project`) fed with the phase seconds
of the 7B recipe on GPUs (:data:`SEVEN_B`, with their inputs stated there: a FLOP and decode
model, not a measurement).

Generator path (``--generator-path``): 16 prompts x 4 samples x 16 tokens on ``tiny:small``:
vLLM generation + G's GRPO update (KL to the reference) + the weight sync, against the same GRPO
step in one process (HF ``generate``, then the policy and reference passes, AdamW), both timed in
this run; the single-process update is split into its parts (where a learner's time goes).

Run: ``python bench/pipeline.py`` (~6 min on 2 cores). ``--steps``, ``--set KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
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
    from gad_ray.driver.driver import Driver
    from gad_ray.driver.metrics import read_metrics
    from gad_ray.hydra_app import compose

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
        # as many threads as pinned cores (more would spin against each other on them)
        f"rollout.cpus_per_worker={len(args.rollout_cores)}",
        f"cluster.cpus_per_node={len(args.g_cores)}",
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


def critical_path(p: dict[str, float], d_g_together: bool) -> float:
    """``max(rollout, learners)`` of one step's phase seconds ``p``: rollout = generate + weight
    sync, learners = score + the D and G updates (their max when they ran at the same time)."""
    updates = (max if d_g_together else sum)((p["d_update"], p["g_update"]))
    return max(p["generate"] + p["weight_sync"], p["score"] + updates)


def summarize(rows: list[dict], d_g_together: bool) -> dict[str, float]:
    """Medians over the steps of each phase, the step time, the critical path and their ratio
    (the ratio per step first: response lengths, and so every phase, change from step to step)."""
    phases = [{p: r.get(f"time/{p}", 0.0) for p in PHASES} for r in rows]
    crit = [critical_path(p, d_g_together) for p in phases]
    out = {p: statistics.median(ph[p] for ph in phases) for p in PHASES}
    out["response_len"] = statistics.median(r["response_len_mean"] for r in rows)
    out["step"] = statistics.median(r["s_per_step"] for r in rows)
    out["critical"] = statistics.median(crit)
    out["ratio"] = statistics.median(r["s_per_step"] / c for r, c in zip(rows, crit, strict=True))
    return out


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


def _logp(model: Any, batch: Any, temperature: float) -> Any:
    """The single-process baseline's log-probs of the batch's tokens at ``temperature``."""
    import torch.nn.functional as F

    from gad_ray.algorithms import token_logprobs

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.pad(token_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature), (1, 0))


def generator_path(overrides: list[str], repeats: int = 5) -> dict[str, float]:
    """Median seconds of each part of the generator path, ours and single-process."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from gad_ray.algorithms import aggregate_loss, kl_penalty, ppo_clip_loss
    from gad_ray.data.batch import make_batch
    from gad_ray.driver.setup import cpus_per_actor
    from gad_ray.hydra_app import compose
    from gad_ray.learner.generator import GeneratorGroup
    from gad_ray.models.loading import resolve_model_path
    from gad_ray.rollout.group import RolloutGroup
    from gad_ray.rollout.types import SamplingParams

    base = ["experiment=tiny_cpu", "algorithm.grpo.n_samples=4", "trainer.run_dir=/tmp/gp"]
    cfg = compose([*base, *overrides])
    path = resolve_model_path(cfg.model.student.path)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randint(12, 24))] for _ in range(16)]
    n, t = 4, 0.8
    sets = [("rollout", "generator")]
    rollout = RolloutGroup(cfg, path, cpus_per_actor(cfg, "rollout", sets))
    gen = GeneratorGroup(cfg, path, cpus_per_rank=cpus_per_actor(cfg, "generator", sets))
    ours: dict[str, list[float]] = {"generate": [], "g_update": [], "weight_sync": []}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        samples = rollout.generate(prompts, SamplingParams(n, t, 1.0, 16), seed=0)
        t1 = time.perf_counter()
        batch = make_batch(
            [prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples], 0
        )
        gen.train_grpo(batch, torch.randn(len(samples)), temperature=t)
        t2 = time.perf_counter()
        gen.sync_weights(rollout.workers)
        t3 = time.perf_counter()
        for k, seconds in zip(ours, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            ours[k].append(seconds)
    rollout.shutdown()
    gen.shutdown()

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    parts = ("policy forward", "reference forward", "backward", "optimizer")
    single: dict[str, list[float]] = {k: [] for k in ("generate", "g_update", *parts)}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        rows = []
        with torch.no_grad():
            for p in prompts:
                out = model.generate(
                    torch.tensor([p] * n),
                    do_sample=True,
                    temperature=t,
                    top_k=0,
                    max_new_tokens=16,
                    min_new_tokens=16,
                )
                rows += [(p, r[len(p) :].tolist()) for r in out]
        t1 = time.perf_counter()
        batch = make_batch([p for p, _ in rows], [r for _, r in rows], 0)
        mask, adv = batch.response_mask, torch.randn(len(rows))[:, None] * batch.response_mask

        new = _logp(model, batch, t)
        ticks = [t1, time.perf_counter()]
        with torch.no_grad():
            old_ref = _logp(ref, batch, t)
        ticks.append(time.perf_counter())
        pg, _ = ppo_clip_loss(new, new.detach(), adv, mask)
        kl = aggregate_loss(kl_penalty(new, old_ref), mask, "token-mean")
        loss = aggregate_loss(pg, mask, "token-mean") + 0.001 * kl
        loss.backward()
        ticks.append(time.perf_counter())
        opt.step()
        opt.zero_grad()
        ticks.append(time.perf_counter())
        single["generate"].append(t1 - t0)
        single["g_update"].append(ticks[-1] - t1)
        for k, (a, b) in zip(parts, itertools.pairwise(ticks), strict=True):
            single[k].append(b - a)
    med = lambda xs: statistics.median(xs[1:])  # noqa: E731 (the first is a warm-up)
    out = {f"ours {k}": med(v) for k, v in ours.items()}
    out["ours total"] = sum(out.values())
    out |= {f"single-process {k}": med(v) for k, v in single.items() if k not in parts}
    out["single-process total"] = out["single-process generate"] + out["single-process g_update"]
    out |= {f"  of which {k}": med(single[k]) for k in parts}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="GAD steps per mode")
    ap.add_argument("--skip", type=int, default=2, help="GAD steps left out (warm-up)")
    ap.add_argument("--rollout-cores", type=int, nargs="+", default=[0])
    ap.add_argument("--g-cores", type=int, nargs="+", default=[1])
    ap.add_argument("--d-cores", type=int, nargs="+", default=[1])
    ap.add_argument("--out", default="outputs/bench_pipeline")
    ap.add_argument("--set", action="append", default=[], help="a Hydra override, repeatable")
    ap.add_argument("--generator-path", action="store_true", help="only the generator path")
    args = ap.parse_args()

    import ray

    if args.generator_path:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            parts = generator_path(args.set)
        finally:
            ray.shutdown()
        print("\ngenerator path, 16 prompts x 4 samples x 16 tokens, tiny:small (median s)\n")
        print("| part | seconds |\n|---|---:|")
        for k, v in parts.items():
            print(f"| {k} | {v:.3f} |")
        ratio = parts["ours total"] / parts["single-process total"]
        print(f"\nours / single-process: {ratio:.2f}")
        return

    if len(args.g_cores) != len(args.d_cores):
        ap.error("--g-cores and --d-cores need as many cores (learners get one thread count)")
    separate = not set(args.g_cores) & set(args.d_cores)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        results = {m: summarize(run_mode(m, args), m != "sync") for m in MODES}
    finally:
        ray.shutdown()
    print(
        f"\ncores: rollout {args.rollout_cores}, G {args.g_cores}, D {args.d_cores}; "
        f"median of {args.steps - args.skip} GAD steps (seconds)\n"
    )
    cols = ("response_len", *PHASES, "step", "critical", "ratio")
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
