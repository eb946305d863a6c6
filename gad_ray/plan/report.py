"""Printing the plan: the per-GPU layout and memory table, host memory per node, and
``gad-train ... plan_only=true``."""

from __future__ import annotations

import math
import sys

from gad_ray import recipes
from gad_ray.config.schema import Config, ConfigError
from gad_ray.placement import pool, role_sizes
from gad_ray.plan.fit import QUIET_RAY, Plan, groups, make_plan, where
from gad_ray.plan.host import HOST_PHASES, host_total
from gad_ray.plan.learners import (
    attention_of,
    kv_bytes_per_token,
    learners,
    micro_batch_tokens,
    packed,
    plan_roles,
    vllm_bytes,
    worst_micro_batch,
)
from gad_ray.plan.step import layer_saved
from gad_ray.plan.units import GiB, count, gib, plural

OFFLOAD_KNOBS = ("offload_idle", "param_offload", "optimizer_offload", "reference_offload")


def header(cfg: Config) -> list[str]:
    """The run's shape: cluster, learners, micro batches, vLLM."""
    c, lc, r = cfg.cluster, cfg.learner, cfg.rollout
    if c.gpus_per_node == 0:
        sizes = role_sizes(cfg, plan_roles(cfg))
        return [
            f"Plan: {cfg.name} on a CPU-only cluster (cluster.gpus_per_node=0): "
            + ", ".join(f"{n} {role}" for role, (n, _) in sizes.items())
            + " actors share the node's cores; no GPU memory to plan."
        ]
    backend = "FSDP2" if lc.backend == "fsdp" else f"DeepSpeed ZeRO-{lc.zero_stage}"
    out = [
        f"Plan: {cfg.name} (algorithm={cfg.algorithm.name}), {plural(c.num_nodes, 'node')} x "
        f"{plural(c.gpus_per_node, 'GPU')} of {c.gpu_memory_gib:g} GiB and "
        f"{c.host_memory_gib:g} GiB of host memory, cluster.placement={c.placement}"
    ]
    for lr in learners(cfg):
        sh, d = lr.shape, cfg.model.discriminator.path
        what = cfg.model.student.path if lr.key == "G" else "the student's backbone + scalar head"
        what = d if lr.key == "D" and d != "student" else what
        spec = (cfg.model.student if lr.key == "G" else cfg.model.discriminator).lora
        trained = "fp32 master weights + AdamW"
        if not lr.full:
            on = (
                "G's base (learner.shared_base)" if lr.shared and lr.key == "D" else "a frozen base"
            )
            trained = f"LoRA r={spec.rank} on {on}: {count(lr.trained)} fp32 masters + AdamW"
        step = {"sft": "SFT", "grpo": "GRPO + KL reference", "bt": "BT"}[lr.kind]
        out += [
            f"  {lr.key}: {what}, {count(lr.params)} params ({sh.layers} layers, hidden "
            f"{sh.hidden}, vocab {sh.vocab}); its update: {step}",
            f"     {plural(lr.ranks, backend + ' rank')}, {'bf16' if lr.c == 2 else 'fp32'} "
            f"compute, {trained}, gradient checkpointing {'on' if lr.checkpointing else 'off'}",
        ]
    knobs = "".join(f", learner.{k}=true" for k in OFFLOAD_KNOBS if getattr(lc, k))
    by = "max_tokens_per_micro_batch" if lc.max_tokens_per_micro_batch else "micro_batch_size"
    how = "packed" if packed(cfg) else "padded to the longest row"
    out.append(
        f"  micro batches of {micro_batch_tokens(cfg)} computed tokens ({how}; learner.{by}){knobs}"
    )
    share, weights, kv = vllm_bytes(cfg)
    sleeps = "asleep while the learners train" if r.sleep_when_idle else "awake throughout"
    out += [
        f"  vLLM: {plural(r.num_workers, 'worker')} x tp {r.tensor_parallel_size}, {gib(share)} "
        f"per GPU awake: weights {gib(weights)}, KV cache {gib(max(kv, 0))}",
        f"     = {kv / kv_bytes_per_token(cfg) / 1e3:.0f}K tokens per worker; {sleeps}",
    ]
    return out


def notes(plan: Plan) -> list[str]:
    cfg, out = plan.cfg, []
    mb, att = worst_micro_batch(cfg), attention_of(cfg, True)
    full = [
        f"{lr.key} {gib(lr.shape.layers * layer_saved(lr, mb, att, True))}"
        for lr in learners(cfg)
        if lr.checkpointing
    ]
    if full:
        out.append(f"Activations without gradient checkpointing: {', '.join(full)}.")
    if any(r.startswith("proxy") for rs in recipes.build(cfg).role_sets() for r in rs):
        out.append("The proxy learner and its rollout workers are not in this plan.")
    return out


def _table(title: str, phases: tuple[str, ...], terms: dict, width: int) -> list[str]:
    lines = [f"{title}".ljust(width + 2) + "".join(f"{p:>10}" for p in phases)]
    for label, by_phase in terms.items():
        if any(by_phase.get(p) for p in phases):
            cells = [by_phase.get(p, 0.0) / GiB for p in phases]
            lines.append(
                f"  {label:<{width}}" + "".join(f"{v:>10.2f}" if v else f"{'-':>10}" for v in cells)
            )
    total = [sum(t.get(p, 0.0) for t in terms.values()) / GiB for p in phases]
    return lines + [f"  {'total':<{width}}" + "".join(f"{v:>10.2f}" for v in total)]


def format_plan(plan: Plan, placed: str | None = None) -> str:
    """The printed plan: header, per-GPU actors, per-phase estimates, host memory per node,
    notes, verdict."""
    lines = header(plan.cfg) + ([placed] if placed else [])
    if not plan.gpus:
        return "\n".join(lines)
    lines += ["", "GPU  node  actors"]
    lines += [f"{g.index:<4} {g.node:<5} {', '.join(g.actors) or '-'}" for g in plan.gpus]
    width = max(len(t) for g in plan.gpus for t in g.terms) + 2
    width = max([width] + [len(t) + 2 for h in plan.hosts for t in h])
    for group in groups(plan.gpus):
        rep = group[0]
        lines += [""] + _table(
            f"{where(group)}, peak GiB per phase:", plan.phases, rep.terms, width
        )
        peaks = [f"{p}: {m}" for p, m in rep.moments.items()]
        if peaks:
            lines.append(f"  (the learner's largest moment in its update: {'; '.join(peaks)})")
    cap = plan.host_capacity
    for node, terms in enumerate(plan.hosts):
        title = f"Node {node}, host memory GiB:"
        lines += [""] + _table(title, HOST_PHASES, terms, width)
    lines += [""] + notes(plan)
    if plan.problems:
        lines += ["", "Does NOT fit:"] + [f"  - {p}" for p in plan.problems]
        return "\n".join(lines)
    peak = max((g.total(p), p, g.index) for g in plan.gpus for p in plan.phases)
    group = next(gr for gr in groups(plan.gpus) if any(g.index == peak[2] for g in gr))
    host, phase, node = max(
        (host_total(h, p), p, n) for n, h in enumerate(plan.hosts) for p in HOST_PHASES
    )
    lines += [
        "",
        f"Fits: the peak is {gib(peak[0])} ({peak[1]} on {where(group)}) of "
        f"{gib(plan.capacity)}, {gib(plan.capacity - peak[0])} to spare; host memory "
        f"{gib(host)} ({phase}, node {node}) of {gib(cap)}.",
    ]
    return "\n".join(lines)


def place_on_ray(cfg: Config) -> str:
    """Create the run's placement group (:func:`gad_ray.placement.plan_placement`) on Ray's
    logical GPUs and release it. Starts a private local Ray sized to the cluster when none is
    running (never joins a live one: planning reserves nothing and needs no GPU)."""
    import ray

    from gad_ray.placement import plan_placement, release

    spec = pool(cfg, plan_roles(cfg))
    if spec is None:
        return "Ray: a CPU-only cluster; Ray's local scheduler places the actors."
    gpus = cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
    started = not ray.is_initialized()
    if not started and ray.cluster_resources().get("GPU", 0) < gpus:
        raise ConfigError(f"the running Ray has fewer than the {gpus} GPUs of the cluster config")
    if started:
        cpus = math.ceil(sum(b["CPU"] for b in spec.bundles)) + 1
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, **QUIET_RAY)
    try:
        release(plan_placement(cfg, plan_roles(cfg)))
    finally:
        if started:
            ray.shutdown()
    return (
        f"Ray: the placement group of {plural(len(spec.bundles), 'bundle')} was placed on "
        f"{plural(gpus, 'logical GPU')} and released."
    )


def run_plan(cfg: Config) -> int:
    """``gad-train <overrides> plan_only=true``: print the plan; 0 when it fits, else 2."""
    try:
        plan = make_plan(cfg)
        placed = place_on_ray(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, placed))
    if plan.problems:
        print(
            "error: the run does not fit its GPUs or nodes:\n  - " + "\n  - ".join(plan.problems),
            file=sys.stderr,
        )
        return 2
    return 0
