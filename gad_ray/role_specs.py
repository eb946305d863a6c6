"""The role registry: every role a recipe may name, declared once.

A role is a group of Ray actors the driver builds when a stage needs it. Its :class:`RoleSpec`
says what it is (``kind``), how many actors it has and how many GPUs each, its share of a GPU
under ``cluster.placement=colocated``, the prefix of its update's metrics, what builds it and
what is checked before any actor starts (``factory`` and ``preflight``: ``"module:function"``,
imported only when called, by :mod:`gad_ray.driver.roles`), and what the memory plan counts
for it (``plan_label``; ``frozen_model`` for a forward-only model the plan adds per GPU).
:mod:`gad_ray.placement`, :mod:`gad_ray.driver.roles`, the driver's metrics and
:mod:`gad_ray.plan` read it; adding a role is one entry here (docs/architecture.md).

A factory is called as ``factory(cfg, student_path, cpus, placement, **options)``, the options
being the recipe's for that role (:class:`~gad_ray.recipes.stages.Recipe`); a preflight as
``preflight(cfg)``, raising an error that names the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gad_ray.config.schema import Config, ModelSpec

Kind = Literal["rollout", "learner", "frozen"]  # vLLM/HF workers; trained ranks; forward-only


@dataclass(frozen=True)
class RoleSpec:
    kind: Kind
    size: Callable[[Config], tuple[int, int]]  # (actors, GPUs per actor when not colocated)
    colocated_share: float  # the fraction of a shared GPU each actor asks Ray for
    factory: str  # "module:function" building the group
    plan_label: str  # how the memory plan names one actor ("G rank 0")
    metric_prefix: str | None = None  # a learner's update metrics: "<prefix>_<name>"
    preflight: str | None = None  # "module:function(cfg)": checked before any actor starts
    frozen_model: Callable[[Config], ModelSpec | None] | None = None  # counted by the plan


def _workers(cfg: Config) -> tuple[int, int]:
    return cfg.rollout.num_workers, cfg.rollout.tensor_parallel_size


# The colocated shares make the roles alive at one time fit one GPU's 1.0: rollout + G + D,
# proxy + its rollout, the frozen proxy or on-policy distillation's teacher + G + the rollout.
# (Ray only places by them; memory is managed by vLLM's gpu_memory_utilization, sleep mode and
# learner offload.)
ROLES: dict[str, RoleSpec] = {
    "rollout": RoleSpec(
        "rollout", _workers, 0.4, "gad_ray.driver.roles:build_rollout", "vLLM worker"
    ),
    "generator": RoleSpec(
        "learner",
        lambda cfg: (cfg.learner.generator_ranks, 1),
        0.3,
        "gad_ray.driver.roles:build_generator",
        "G rank",
        metric_prefix="g",
    ),
    "discriminator": RoleSpec(
        "learner",
        lambda cfg: (cfg.learner.discriminator_ranks, 1),
        0.3,
        "gad_ray.driver.roles:build_discriminator",
        "D rank",
        metric_prefix="d",
        preflight="gad_ray.driver.roles:check_discriminator",
    ),
    "proxy": RoleSpec(
        "learner",
        lambda cfg: (cfg.algorithm.proxy_kd.ranks, 1),
        0.3,
        "gad_ray.driver.roles:build_proxy",
        "proxy rank",
        metric_prefix="proxy",
        preflight="gad_ray.driver.roles:check_proxy",
    ),
    "proxy_rollout": RoleSpec(
        "rollout",
        _workers,
        0.4,
        "gad_ray.driver.roles:build_proxy_rollout",
        "proxy vLLM worker",
        preflight="gad_ray.driver.roles:check_proxy",
    ),
    "proxy_frozen": RoleSpec(
        "frozen",
        lambda cfg: (cfg.algorithm.proxy_kd.ranks, 1),
        0.3,
        "gad_ray.driver.roles:build_proxy",
        "proxy rank",
    ),
    "teacher_model": RoleSpec(
        "frozen",
        lambda cfg: (cfg.algorithm.opd.ranks, 1),
        0.3,
        "gad_ray.recipes.opd:teacher_group",
        "teacher rank",
        preflight="gad_ray.recipes.opd:check_teacher_tokenizer",
        frozen_model=lambda cfg: cfg.algorithm.opd.teacher,
    ),
}


def spec(role: str) -> RoleSpec:
    """The spec of ``role``; an unknown name is a clear error listing the known ones."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {sorted(ROLES)} (gad_ray/role_specs.py)")
    return ROLES[role]
