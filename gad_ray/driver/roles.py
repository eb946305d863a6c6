"""The one factory of role groups: every actor of every algorithm is built and placed here.

A role is a name a recipe uses (``rollout``, ``generator``, ``discriminator``, ``proxy``,
``proxy_rollout``, ``proxy_frozen``, ``teacher_model``); its kind fixes what is built (a rollout group or a learner
group of some model) and how many actors it has (:func:`gad_ray.placement.role_size`). On a GPU
cluster ``cluster.placement`` applies to every role: colocated, one pool of GPUs shared by all
roles of the run; disaggregated, a placement group for each set of roles started together
(released when they stop), every set checked against the cluster before any actor starts. On
CPU every actor gets its share of the cores. :class:`Roles` keeps the groups a stage needs alive
and stops the others; stopping them all (a restart) waits until their CPUs, and on GPUs their
GPU memory, are free again (docs/operations.md#restarts-wait-for-the-stopped-roles-memory).
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
import warnings
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gad_ray.config.schema import Config, ConfigError
from gad_ray.driver.setup import cpus_per_actor
from gad_ray.models.loading import resolve_model_path
from gad_ray.placement import (
    RolePlacement,
    check_gpus,
    is_rollout,
    plan_placement,
    release,
    role_size,
)
from gad_ray.role_specs import spec

MIN_FREE_CPUS = 0.01  # fewer free CPUs than this: the cluster is busy (Ray's unit is 1e-4)
GIB = 1 << 30
GPU_FREE_TIMEOUT_S = 180.0  # a stopped role's GPU memory must be free again within this
GPU_FREE_SLACK = GIB  # used memory above a GPU's own before the roles that still counts as free

# a node's id -> the used memory in bytes of each of its GPUs, by Ray's GPU id (what
# ray.get_gpu_ids() gives an actor there); Roles takes another one in tests
GpuProbe = Callable[[str], dict[str, int]]


class GpuMemoryHeld(RuntimeError):
    """The GPUs stopped roles held did not free their memory in time."""


@ray.remote(num_cpus=0)
def _gpu_memory_used() -> dict[str, int] | None:
    """This node's GPUs' used memory from nvidia-smi (NVML: no CUDA context of its own), keyed
    by index and by UUID (Ray's GPU ids are either); None without nvidia-smi."""
    query = ["nvidia-smi", "--query-gpu=index,uuid,memory.used", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, check=True, timeout=60).stdout
    except FileNotFoundError:
        return None
    used = {}
    for line in out.strip().splitlines():
        index, uuid, mib = (field.strip() for field in line.split(","))
        used[index] = used[uuid] = int(mib) << 20
    return used


def nvidia_smi_probe(node_id: str, timeout_s: float = 120.0) -> dict[str, int]:
    """The :data:`GpuProbe` of a GPU cluster: nvidia-smi on node ``node_id`` (a 0-CPU task). A
    node without nvidia-smi (logical GPUs), or that does not answer within ``timeout_s``, reads
    as no memory in use: nothing to wait for there."""
    where = NodeAffinitySchedulingStrategy(node_id, soft=False)
    ref = _gpu_memory_used.options(scheduling_strategy=where).remote()
    try:
        used = ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        used = None
    if used is None:
        why = f"node {node_id}: no GPU memory reading (nvidia-smi); not waiting for its GPUs"
        warnings.warn(why, stacklevel=2)
        return {}
    return used


def _actor_gpus(_actor: Any) -> tuple[str, str, list[str]]:
    """Run in an actor (``__ray_call__``): its node's id and IP, the GPU ids Ray gave it."""
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]


def preflight(cfg: Config, role_sets: list[tuple[str, ...]]) -> None:
    """Before Ray starts: the packages the backends need are installed, the teacher's key is
    set, the student resolves, and each role's own check (:mod:`gad_ray.role_specs`: e.g. D
    and the proxy share the student's tokenizer) passes."""
    from gad_ray.models.loading import model_max_context
    from gad_ray.teacher.fetcher import read_api_key

    roles = sorted({r for rs in role_sets for r in rs})
    needs = {"learner.backend=deepspeed": (cfg.learner.backend == "deepspeed", "deepspeed")}
    needs["rollout.backend=vllm"] = (cfg.rollout.backend == "vllm", "vllm")
    for key, (used, package) in needs.items():
        if used and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{key} needs the {package} package, which is not installed: pip install "
                f"{package} (or pip install -e '.[gpu]' / '.[cpu]'), or choose another backend"
            )
    if cfg.teacher.source == "api":
        read_api_key(cfg.teacher.api)  # TeacherError naming the variable, never the key
    model_max_context(cfg.model.student.path)
    checks = {spec(r).preflight for r in roles} - {None}
    for ref in sorted(checks):  # one call per check, e.g. the proxy's for both its roles
        resolve(ref)(cfg)


def resolve(ref: str) -> Callable[..., Any]:
    """The function a registry entry names as ``"module:function"``."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# -- the registry's factories and checks (gad_ray/role_specs.py) ------------------------------
def check_discriminator(cfg: Config) -> None:
    from gad_ray.discriminator.model import check_discriminator_tokenizer, discriminator_source
    from gad_ray.models.loading import model_max_context

    model_max_context(discriminator_source(cfg))
    check_discriminator_tokenizer(cfg)


def check_proxy(cfg: Config) -> None:
    from gad_ray.learner.proxy import check_proxy_tokenizer
    from gad_ray.models.loading import model_max_context

    model_max_context(cfg.algorithm.proxy_kd.proxy.path)
    check_proxy_tokenizer(cfg)


def build_rollout(cfg: Config, student_path: str, cpus: float, place: Any, **_: Any) -> Any:
    from gad_ray.rollout.group import RolloutGroup

    return RolloutGroup(cfg, student_path, cpus, place)


def build_proxy_rollout(cfg: Config, student_path: str, cpus: float, place: Any, **_: Any) -> Any:
    from gad_ray.learner.proxy import proxy_view
    from gad_ray.rollout.group import RolloutGroup

    path = resolve_model_path(cfg.algorithm.proxy_kd.proxy.path)
    return RolloutGroup(proxy_view(cfg), path, cpus, place)


def build_generator(cfg: Config, student_path: str, cpus: float, place: Any, **opts: Any) -> Any:
    from gad_ray.learner.generator import GeneratorGroup

    return GeneratorGroup(cfg, student_path, cpus_per_rank=cpus, placement=place, **opts)


def build_discriminator(
    cfg: Config, student_path: str, cpus: float, place: Any, **opts: Any
) -> Any:
    from gad_ray.discriminator.learner import DiscriminatorGroup

    return DiscriminatorGroup(cfg, cpus_per_rank=cpus, placement=place, **opts)


def build_proxy(
    cfg: Config, student_path: str, cpus: float, place: Any, path: str | None = None, **opts: Any
) -> Any:
    """The proxy being aligned, or (``path``: its export) frozen for the student's stage."""
    from gad_ray.learner.proxy import ProxyGroup

    path = path or resolve_model_path(cfg.algorithm.proxy_kd.proxy.path)
    return ProxyGroup(cfg, path, cpus_per_rank=cpus, placement=place, **opts)


SHARED_ROLES = {"generator", "discriminator"}  # one group with learner.shared_base


class Roles:
    """The live role groups of a run, built on demand (``ensure``) in their planned places."""

    def __init__(
        self,
        cfg: Config,
        student_path: str,
        options: dict[str, dict[str, Any]],
        role_sets: list[tuple[str, ...]],
        gpu_probe: GpuProbe = nvidia_smi_probe,
        gpu_free_timeout_s: float = GPU_FREE_TIMEOUT_S,
    ) -> None:
        """On a GPU cluster ``gpu_probe`` reads each GPU's used memory now, before any role, and
        again on :meth:`shutdown`, until the GPUs the roles held are back to it."""
        self.cfg, self.student_path, self.options = cfg, student_path, options
        self.role_sets = role_sets
        self.groups: dict[str, Any] = {}
        self.asleep: set[str] = set()  # rollout roles whose vLLM is in sleep mode
        self.places: dict[str, RolePlacement] = {}  # where each placed role's actors go
        self.on_gpus = cfg.cluster.gpus_per_node > 0
        self.shared = self.on_gpus and cfg.cluster.placement == "colocated"
        if self.on_gpus:
            check_gpus(cfg, role_sets)
            self.check_cluster_gpus()
        if self.shared:
            union = tuple(dict.fromkeys(r for roles in role_sets for r in roles))
            self.places = plan_placement(cfg, union)
        self.cpu_scale = 1.0 if self.on_gpus else self.fit_cpus()
        self.gpu_probe, self.gpu_free_timeout_s = gpu_probe, gpu_free_timeout_s
        self.held: dict[str, set[str]] = {}  # node id -> the GPU ids the roles' actors were given
        self.node_ips: dict[str, str] = {}
        self.gpus_before = self.probe_gpus() if self.on_gpus else {}  # node -> GPU -> used

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
        """Whether roles ``a`` and ``b`` run on devices of their own, so their calls can
        overlap: disaggregated GPUs. Colocated roles share GPUs; on a CPU-only cluster the
        roles share the cores (each takes all of its share when it runs); one group serving
        both (``learner.shared_base``) shares its actors."""
        return self.on_gpus and not self.shared and not self.same_group(a, b)

    def same_group(self, a: str, b: str) -> bool:
        """Whether one group serves roles ``a`` and ``b`` (G and D on a shared LoRA base)."""
        return a != b and {a, b} <= SHARED_ROLES and self.cfg.learner.shared_base

    def ensure(self, names: tuple[str, ...]) -> list[str]:
        """Stop the groups not in ``names``, build the missing ones; return the new ones."""
        for name in [n for n in self.groups if n not in names]:
            group = self.groups.pop(name)
            if not any(g is group for g in self.groups.values()):
                group.shutdown()
            self.asleep.discard(name)
            if not self.shared:
                self.release_unused()
        new = [n for n in names if n not in self.groups]
        if self.on_gpus and not self.shared and new:
            self.places |= plan_placement(self.cfg, tuple(new))
        for name in new:
            twin = next((g for n, g in self.groups.items() if self.same_group(n, name)), None)
            self.groups[name] = twin if twin is not None else self.build(name, names)
            if self.on_gpus and twin is None:
                self.record_gpus(self.groups[name])
        return new

    def probe_gpus(self, nodes: set[str] | None = None) -> dict[str, dict[str, int]]:
        """Used memory of the GPUs of the cluster's live GPU nodes (those of ``nodes``; default
        all): node id -> GPU id -> bytes. A dead node is left out (its GPUs went with it)."""
        live = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        return {node: self.gpu_probe(node) for node in live if nodes is None or node in nodes}

    def record_gpus(self, group: Any) -> None:
        """Note the GPUs the actors of ``group`` were given (asked now: a role that dies later
        cannot say)."""
        for node, ip, gpus in ray.get([w.__ray_call__.remote(_actor_gpus) for w in group.workers]):
            self.held.setdefault(node, set()).update(gpus)
            self.node_ips[node] = ip

    def check_cluster_gpus(self) -> None:
        """The Ray cluster has the GPUs the config declares (checked before any actor)."""

        want = self.cfg.cluster.gpus_per_node * self.cfg.cluster.num_nodes
        have = ray.cluster_resources().get("GPU", 0)
        if have < want:
            raise ConfigError(
                f"the Ray cluster has {have:g} GPUs, but cluster.num_nodes x "
                f"cluster.gpus_per_node = {self.cfg.cluster.num_nodes} x "
                f"{self.cfg.cluster.gpus_per_node} = {want}: set them to the cluster's"
            )

    def cpu_need(self) -> float:
        """CPU-only cluster: the CPUs the largest set of roles alive at one time asks for."""
        return max(
            sum(role_size(self.cfg, r)[0] * cpus_per_actor(self.cfg, r, self.role_sets) for r in rs)
            for rs in self.role_sets
        )

    def fit_cpus(self) -> float:
        """CPU-only cluster: the factor (<= 1) that shrinks every actor's CPU share so the roles
        alive at one time fit the CPUs Ray has free (they take turns on the cores anyway); a
        shrunk share still runs one thread."""
        free = ray.available_resources().get("CPU", 0.0)
        if free < MIN_FREE_CPUS:
            raise ConfigError(
                f"the Ray cluster has no free CPU for the roles ({ray.cluster_resources()}); "
                "start it with more (ray start --num-cpus N) or stop what holds them"
            )
        return min(1.0, free / self.cpu_need())

    def release_unused(self) -> None:
        """Disaggregated: give back the placement groups none of whose roles is running."""
        by_pg: dict[int, list[str]] = {}
        for role, place in self.places.items():
            by_pg.setdefault(id(place.pg), []).append(role)
        for roles in by_pg.values():
            if not any(r in self.groups for r in roles):
                release({r: self.places.pop(r) for r in roles})

    def build(self, name: str, alive: tuple[str, ...] = ()) -> Any:
        """Start the group of role ``name`` with the recipe's options for it; with
        ``learner.shared_base`` and both G and D among the ``alive`` roles, the one group that
        serves both (built with G's options, in G's place)."""
        from gad_ray.discriminator.shared import SharedGroup

        if name in SHARED_ROLES and SHARED_ROLES <= set(alive) and self.cfg.learner.shared_base:
            name = "generator"
            cfg, opts, place = self.cfg, dict(self.options.get(name, {})), self.places.get(name)
            cpus = cpus_per_actor(cfg, name, self.role_sets) * self.cpu_scale
            return SharedGroup(cfg, self.student_path, cpus_per_rank=cpus, placement=place, **opts)
        opts, place = dict(self.options.get(name, {})), self.places.get(name)
        cpus = cpus_per_actor(self.cfg, name, self.role_sets) * self.cpu_scale
        return resolve(spec(name).factory)(self.cfg, self.student_path, cpus, place, **opts)

    def shutdown(self, strict: bool = True) -> None:
        """Stop every group; return once their CPUs (CPU-only cluster) or the GPU memory they
        held (GPU cluster, :meth:`wait_for_gpu_memory`) are free again. GPU memory still held
        after the wait raises :class:`GpuMemoryHeld` (``strict``: roles are built next, as in a
        restart) or only warns (the end of a run)."""
        for group in {id(g): g for g in self.groups.values()}.values():
            group.shutdown()
        self.groups = {}
        release(self.places)
        self.places = {}
        if not self.on_gpus:
            self.wait_for_cpus(self.cpu_need() * self.cpu_scale)
        else:
            try:
                self.wait_for_gpu_memory()
            except GpuMemoryHeld as err:
                if strict:
                    raise
                warnings.warn(str(err), stacklevel=2)

    def wait_for_gpu_memory(self, poll_s: float = 0.5) -> None:
        """Wait until every GPU the stopped roles held uses no more memory than before them
        (+ :data:`GPU_FREE_SLACK`): ``ray.kill`` returns before a process has exited and its
        CUDA memory is freed, and a vLLM started then sizes its KV cache to what is free at its
        start, or fails. Past ``gpu_free_timeout_s``, :class:`GpuMemoryHeld` names each GPU
        still held, its node, and its memory in use now and before."""
        held, self.held = self.held, {}
        deadline = time.monotonic() + self.gpu_free_timeout_s
        while True:
            busy = []
            for node, used in sorted(self.probe_gpus(set(held)).items()):
                before = self.gpus_before.get(node, {})
                for gpu in sorted(held[node]):
                    if used.get(gpu, 0) > before.get(gpu, 0) + GPU_FREE_SLACK:
                        busy.append((node, gpu, used[gpu], before.get(gpu, 0)))
            if not busy:
                return
            if time.monotonic() > deadline:
                raise GpuMemoryHeld(
                    f"the GPUs of the stopped roles still hold memory {self.gpu_free_timeout_s:g}"
                    " s after their actors were killed: "
                    + "; ".join(
                        f"node {self.node_ips.get(n, n)} GPU {g}: {u / GIB:.1f} GiB in use, "
                        f"{b / GIB:.1f} GiB before the roles started"
                        for n, g, u, b in busy
                    )
                    + " (see nvidia-smi on the node for the processes that hold it); a new vLLM "
                    "would not find the memory it needs"
                )
            time.sleep(poll_s)

    @staticmethod
    def wait_for_cpus(cpus: float, timeout_s: float = 30.0) -> None:
        """Wait (up to ``timeout_s``) until Ray has ``cpus`` free: ``ray.kill`` returns before
        an actor's process is gone, and roles built at once after (a restart, the next run in
        this Ray session) would otherwise be fitted to the few CPUs not yet released."""
        deadline = time.monotonic() + timeout_s
        while ray.available_resources().get("CPU", 0.0) < cpus - 1e-6:
            if time.monotonic() > deadline:
                return  # someone else holds them: fit_cpus shrinks the next roles' shares
            time.sleep(0.05)
