"""The one factory of role groups: every actor of every algorithm is built and placed here.

A role is a name a recipe uses (``rollout``, ``generator``, ``discriminator``, ``proxy``,
``proxy_rollout``, ``proxy_frozen``); its kind fixes what is built (a rollout group or a learner
group of some model) and how many actors it has (:func:`gad_ray.placement.role_size`). On a GPU
cluster one placement pool is planned for all the role sets of the run
(:func:`gad_ray.placement.plan_placement`), so ``cluster.placement`` (colocated or
disaggregated) applies to every role; on CPU every actor gets its share of the cores.
:class:`Roles` keeps the groups a stage needs alive and stops the others.
"""

from __future__ import annotations

from typing import Any

from gad_ray.config.schema import Config
from gad_ray.driver.setup import cpu_threads_per_rank, cpus_per_rollout_worker
from gad_ray.models.loading import resolve_model_path
from gad_ray.placement import RolePlacement, is_rollout, plan_placement, release


class Roles:
    """The live role groups of a run, built on demand (``ensure``) in their planned places."""

    def __init__(
        self,
        cfg: Config,
        student_path: str,
        options: dict[str, dict[str, Any]],
        role_sets: list[tuple[str, ...]],
    ) -> None:
        self.cfg, self.student_path, self.options = cfg, student_path, options
        self.role_sets = role_sets
        self.groups: dict[str, Any] = {}
        self.asleep: set[str] = set()  # rollout roles whose vLLM is in sleep mode
        self.pools: dict[str, RolePlacement] = {}
        if cfg.cluster.gpus_per_node > 0:
            self.pools = plan_placement(cfg, role_sets)

    def __getitem__(self, name: str) -> Any:
        if name not in self.groups:
            raise KeyError(f"role {name!r} is not running now (running: {sorted(self.groups)})")
        return self.groups[name]

    def alive(self, name: str) -> bool:
        return name in self.groups

    @staticmethod
    def is_rollout(name: str) -> bool:
        return is_rollout(name)

    def disjoint(self, a: str, b: str) -> bool:
        """Whether roles ``a`` and ``b`` never share a device (so their calls can overlap):
        distinct GPUs; never on a CPU-only cluster, where the roles take turns on the cores."""
        pa, pb = self.pools.get(a), self.pools.get(b)
        if pa is None or pb is None:
            return False
        return pa.pg is not pb.pg or not set(pa.bundles) & set(pb.bundles) or pa.num_gpus >= 1

    def ensure(self, names: tuple[str, ...]) -> list[str]:
        """Stop the groups not in ``names``, build the missing ones; return the new ones."""
        for name in [n for n in self.groups if n not in names]:
            self.groups.pop(name).shutdown()
            self.asleep.discard(name)
        built = []
        for name in names:
            if name not in self.groups:
                self.groups[name] = self.build(name)
                built.append(name)
        return built

    def build(self, name: str) -> Any:
        """Start the group of role ``name`` with the recipe's options for it."""
        from gad_ray.discriminator.learner import DiscriminatorGroup
        from gad_ray.learner.generator import GeneratorGroup
        from gad_ray.learner.proxy import ProxyGroup, proxy_view
        from gad_ray.rollout.group import RolloutGroup

        cfg, opts, place = self.cfg, dict(self.options.get(name, {})), self.pools.get(name)
        threads = cpu_threads_per_rank(cfg, self.role_sets)
        rollout_cpus = cpus_per_rollout_worker(cfg, self.role_sets)
        proxy_path = lambda: resolve_model_path(cfg.algorithm.proxy_kd.proxy.path)  # noqa: E731
        if name == "rollout":
            return RolloutGroup(cfg, self.student_path, rollout_cpus, place)
        if name == "proxy_rollout":
            return RolloutGroup(proxy_view(cfg), proxy_path(), rollout_cpus, place)
        if name == "generator":
            return GeneratorGroup(
                cfg, self.student_path, cpus_per_rank=threads, placement=place, **opts
            )
        if name == "discriminator":
            return DiscriminatorGroup(cfg, cpus_per_rank=threads, placement=place, **opts)
        if name in ("proxy", "proxy_frozen"):
            path = opts.pop("path", None) or proxy_path()
            return ProxyGroup(cfg, path, cpus_per_rank=threads, placement=place, **opts)
        raise ValueError(f"unknown role {name!r}")

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        self.groups = {}
        release(self.pools)
        self.pools = {}
