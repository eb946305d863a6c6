"""Printing the plan: the per-GPU layout and memory table, and ``gad-train ... plan_only=true``."""

from __future__ import annotations

import math
import sys

from gad_ray.config.schema import Config, ConfigError
from gad_ray.placement import pool
from gad_ray.plan import (
    _QUIET_RAY,
    GiB,
    Plan,
    _gib,
    _n,
    _where,
    groups,
    make_plan,
    plan_roles,
)


def format_plan(plan: Plan, placed: str | None = None) -> str:
    """The printed plan: header, per-GPU actors, per-phase estimates, notes, verdict."""
    lines = list(plan.header)
    if placed:
        lines.append(placed)
    if not plan.gpus:
        return "\n".join(lines)
    lines += ["", "GPU  node  actors"]
    lines += [f"{g.index:<4} {g.node:<5} {', '.join(g.actors) or '-'}" for g in plan.gpus]
    width = max(len(t) for g in plan.gpus for t in g.terms) + 2
    for group in groups(plan.gpus):
        rep = group[0]
        lines += [
            "",
            f"{_where(group)}, peak GiB per phase:".ljust(width + 2)
            + "".join(f"{p:>10}" for p in plan.phases),
        ]
        for label, by_phase in rep.terms.items():
            if any(by_phase.get(p) for p in plan.phases):
                cells = [by_phase.get(p, 0.0) / GiB for p in plan.phases]
                lines.append(
                    f"  {label:<{width}}"
                    + "".join(f"{v:>10.2f}" if v else f"{'-':>10}" for v in cells)
                )
        lines.append(
            f"  {'total':<{width}}" + "".join(f"{rep.total(p) / GiB:>10.2f}" for p in plan.phases)
        )
    lines += [""] + plan.notes
    if plan.problems:
        lines += ["", "Does NOT fit:"] + [f"  - {p}" for p in plan.problems]
    else:
        peak = max((g.total(p), p, g.index) for g in plan.gpus for p in plan.phases)
        group = next(gr for gr in groups(plan.gpus) if any(g.index == peak[2] for g in gr))
        lines += [
            "",
            f"Fits: the peak is {_gib(peak[0])} ({peak[1]} on {_where(group)}) of "
            f"{_gib(plan.capacity)}, {_gib(plan.capacity - peak[0])} to spare.",
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
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, **_QUIET_RAY)
    try:
        release(plan_placement(cfg, plan_roles(cfg)))
    finally:
        if started:
            ray.shutdown()
    return (
        f"Ray: the placement group of {_n(len(spec.bundles), 'bundle')} was placed on "
        f"{_n(gpus, 'logical GPU')} and released."
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
            "error: the run does not fit its GPUs:\n  - " + "\n  - ".join(plan.problems),
            file=sys.stderr,
        )
        return 2
    return 0
