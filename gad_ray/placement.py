"""Resource pools per role: which GPUs (or CPUs) each actor of each role is placed on.

``cluster.placement``:
- ``disaggregated``: every role gets its own GPUs (a rollout worker: ``tensor_parallel_size``
  GPUs; a learner rank: one GPU), in one placement group per set of roles started together;
- ``colocated``: all roles share one pool of GPUs (actor i of every role on GPU i), each actor
  taking a fraction of the GPU; vLLM sleeps while the learners train.

Roles are named by the recipes (``gad_ray/recipes/``) and declared in :mod:`gad_ray.role_specs`
(actor count, colocated share). On CPU (``cluster.gpus_per_node == 0``) no pool is made: Ray's local scheduler places the
actors, each with its share of the cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gad_ray.config.schema import Config, ConfigError
from gad_ray.role_specs import spec


@dataclass
class RolePlacement:
    """Where the actors of one role go: bundle ``bundles[i]`` of ``pg`` for actor i."""

    num_gpus: float
    num_cpus: float
    pg: PlacementGroup | None = None
    bundles: list[int] = field(default_factory=list)

    def options(self, i: int) -> dict[str, Any]:
        """``ray.remote(...).options(**placement.options(i))`` for the i-th actor."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=self.bundles[i]
            )
        return opts


def is_rollout(role: str) -> bool:
    """Whether ``role`` is a group of rollout workers (``rollout``, ``proxy_rollout``)."""
    return spec(role).kind == "rollout"


def role_size(cfg: Config, role: str) -> tuple[int, int]:
    """(number of actors, GPUs per actor when it has GPUs of its own) of ``role``."""
    return spec(role).size(cfg)


def role_sizes(cfg: Config, roles: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """:func:`role_size` of each of ``roles``."""
    return {role: role_size(cfg, role) for role in roles}


def check_gpus(cfg: Config, role_sets: list[tuple[str, ...]]) -> None:
    """Raise :class:`ConfigError` naming the keys when a set of roles alive at one time does not
    fit the cluster's GPUs (nothing to check on a CPU-only cluster)."""
    for roles in role_sets:
        pool(cfg, roles)


@dataclass(frozen=True)
class Pool:
    """A GPU pool: the placement group's bundles, and per role (GPUs per actor, the bundle of
    each actor). Pure data: :func:`pool` builds it from the config without Ray."""

    bundles: list[dict[str, float]]
    roles: dict[str, tuple[float, list[int]]]


def pool(cfg: Config, roles: tuple[str, ...], cpus_per_actor: float = 1.0) -> Pool | None:
    """The pool of ``roles`` under ``cluster.placement`` (None on a CPU-only cluster); a layout
    that does not fit the cluster's GPUs raises :class:`ConfigError` naming the keys."""
    sizes = role_sizes(cfg, roles)
    total_gpus = cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
    if total_gpus == 0:
        return None
    if cfg.cluster.placement == "disaggregated":
        need = sum(n * g for n, g in sizes.values())
        if need > total_gpus:
            raise ConfigError(_too_many(cfg, sizes, need, total_gpus))
        bundles = [{"GPU": g, "CPU": cpus_per_actor} for n, g in sizes.values() for _ in range(n)]
        roles, start = {}, 0
        for role, (n, g) in sizes.items():
            roles[role] = (g, list(range(start, start + n)))
            start += n
        return Pool(bundles, roles)
    if cfg.rollout.tensor_parallel_size != 1:
        raise ConfigError(
            f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size}: colocated "
            "placement runs one vLLM worker per GPU (tensor_parallel_size=1); use "
            "cluster.placement=disaggregated for tensor parallelism"
        )
    size = max(n for n, _ in sizes.values())
    if size > total_gpus:
        raise ConfigError(_too_many(cfg, sizes, size, total_gpus))
    bundles = [{"GPU": 1, "CPU": cpus_per_actor * len(sizes)} for _ in range(size)]
    return Pool(
        bundles,
        {role: (spec(role).colocated_share, list(range(n))) for role, (n, _) in sizes.items()},
    )


def plan_placement(
    cfg: Config, roles: tuple[str, ...], cpus_per_actor: float = 1.0
) -> dict[str, RolePlacement]:
    """Create the pool of ``roles`` (a placement group) and say where each role's actors go."""
    spec = pool(cfg, roles, cpus_per_actor)
    if spec is None:
        return {role: RolePlacement(0, cpus_per_actor) for role in roles}
    pg = _ready(placement_group(spec.bundles, strategy="PACK"), spec.bundles)
    return {
        role: RolePlacement(gpus, cpus_per_actor, pg, bundles)
        for role, (gpus, bundles) in spec.roles.items()
    }


def release(placements: dict[str, RolePlacement]) -> None:
    for pg in {id(p.pg): p.pg for p in placements.values() if p.pg is not None}.values():
        remove_placement_group(pg)


def _ready(pg: PlacementGroup, bundles: list[dict], timeout_s: float = 600.0) -> PlacementGroup:
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement: the cluster has no room for {len(bundles)} bundles {bundles[0]} "
            f"within {timeout_s:.0f} s (cluster resources: {ray.cluster_resources()})"
        ) from None
    return pg


def _too_many(cfg: Config, sizes: dict, need: int, have: int) -> str:
    roles = ", ".join(f"{r}: {n} x {g} GPU" for r, (n, g) in sizes.items())
    return (
        f"cluster.placement={cfg.cluster.placement} needs {need} GPUs ({roles}) but the cluster "
        f"has cluster.num_nodes x cluster.gpus_per_node = {have}"
    )
