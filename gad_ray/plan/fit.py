"""The per-GPU plan and the fit check (the package's docstring, :mod:`gad_ray.plan`, tells
what it counts): the actors on each GPU, their bytes per phase, and the knobs that would make a
GPU or a node fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gad_ray.config.schema import Config, ConfigError, ModelSpec
from gad_ray.placement import pool
from gad_ray.plan.host import HOST_PHASES, host_by_node, host_total
from gad_ray.plan.learners import (
    compute_bytes,
    kv_bytes_per_token,
    learners,
    plan_roles,
    resident,
    shape_of,
    update,
    vllm_bytes,
    worst_micro_batch,
)
from gad_ray.plan.step import Learner
from gad_ray.plan.units import GiB, gib, ranges
from gad_ray.role_specs import spec
from gad_ray.validate import check_config

PROCESS_OVERHEAD = 1.5 * GiB  # per process holding a GPU
PHASES = ("generate", "D update", "G update")
TEACHER_PHASE = "T forward"  # on-policy distillation's frozen teacher scores the samples
OVERHEAD = "CUDA context, NCCL, allocator: 1.5 GiB per process"
QUIET_RAY = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}


@dataclass
class GPU:
    """One GPU: its actors and, per term, its bytes in each phase."""

    index: int
    node: int
    actors: list[str] = field(default_factory=list)
    workers: int = 0  # vLLM workers with a shard here
    learners: list[str] = field(default_factory=list)  # keys of the learners with a rank here
    terms: dict[str, dict[str, float]] = field(default_factory=dict)
    moments: dict[str, str] = field(default_factory=dict)  # phase -> its learner's peak moment

    def total(self, phase: str) -> float:
        return sum(t.get(phase, 0.0) for t in self.terms.values())


@dataclass
class Plan:
    """A config's plan: the phases, every GPU's and node's estimate, what does not fit."""

    cfg: Config
    phases: tuple[str, ...]
    gpus: list[GPU]
    hosts: list[dict[str, dict[str, float]]]  # per node: term -> host phase -> bytes
    problems: list[str]

    @property
    def capacity(self) -> float:
        return self.cfg.cluster.gpu_memory_gib * GiB

    @property
    def host_capacity(self) -> float:
        return self.cfg.cluster.host_memory_gib * GiB


def layout(cfg: Config) -> dict[str, list[tuple[int, ...]]]:
    """Per role, the GPUs of each actor: :func:`~gad_ray.placement.pool`'s bundles packed onto
    the nodes first-fit, as Ray's PACK strategy does (GPU index = node x gpus_per_node + local)."""
    spec, gpn = pool(cfg, plan_roles(cfg)), cfg.cluster.gpus_per_node
    assert spec is not None, "layout() needs a GPU cluster"
    free, gpus = [gpn] * cfg.cluster.num_nodes, []
    for bundle in spec.bundles:
        need = int(bundle["GPU"])
        node = next((k for k, f in enumerate(free) if f >= need), None)
        if node is None:
            raise ConfigError(
                f"a bundle of {need} GPUs (rollout.tensor_parallel_size="
                f"{cfg.rollout.tensor_parallel_size}) fits on no node: cluster.gpus_per_node="
                f"{gpn}, cluster.num_nodes={cfg.cluster.num_nodes}"
            )
        first = node * gpn + gpn - free[node]
        gpus.append(tuple(range(first, first + need)))
        free[node] -= need
    return {role: [gpus[b] for b in bundles] for role, (_, bundles) in spec.roles.items()}


def estimate(cfg: Config) -> tuple[tuple[str, ...], list[GPU]]:
    """The phases of the algorithm and every GPU's terms in each (GPU clusters only)."""
    lrs = learners(cfg)
    phases = tuple(p for p in PHASES if p == "generate" or any(lr.phase == p for lr in lrs))
    gpn = cfg.cluster.gpus_per_node
    gpus = [GPU(g, g // gpn) for g in range(gpn * cfg.cluster.num_nodes)]
    for role, actors in layout(cfg).items():
        label = spec(role).plan_label
        for i, on in enumerate(actors):
            for j, g in enumerate(on):
                shard = f" (tp shard {j + 1}/{len(on)})" if len(on) > 1 else ""
                gpus[g].actors.append(f"{label} {i}{shard}")
                if spec(role).kind == "rollout":
                    gpus[g].workers += 1
                else:
                    gpus[g].learners.append(label[0])
    r, lc = cfg.rollout, cfg.learner
    share = vllm_bytes(cfg)[0]
    vllm = f"vLLM awake, {r.gpu_memory_utilization} x {cfg.cluster.gpu_memory_gib:g} GiB"
    if r.kv_cache_memory_bytes:
        vllm = "vLLM awake, weights + rollout.kv_cache_memory_bytes + 2 GiB"
    states = {lr.key: resident(lr, cfg) for lr in lrs}
    peaks = {lr.key: update(lr, cfg) for lr in lrs}
    # a forward-only model the registry asks the plan to count (on-policy distillation's teacher)
    role = next((r for r in layout(cfg) if spec(r).frozen_model is not None), None)
    frozen = frozen_resident(cfg, role) if role else {}
    if frozen:  # its forward: between sampling and G's update
        phases = (phases[0], TEACHER_PHASE, *phases[1:])
    for gpu in gpus:
        for phase in phases:
            procs, terms = 0, {}
            if gpu.workers and (phase == "generate" or not r.sleep_when_idle):
                terms[vllm] = gpu.workers * share
            else:
                procs += gpu.workers
            for lr in lrs:
                if lr.key not in gpu.learners:
                    continue
                procs += not (lr.shared and lr.key == "D")  # one process for both
                own = phase == lr.phase
                # a shared-base group is onloaded, base and both adapters, in either update
                held = own or (lr.shared and phase in ("D update", "G update"))
                if held or not lc.offload_idle:
                    terms |= states[lr.key]
                if own:
                    terms |= peaks[lr.key].terms
                    gpu.moments[phase] = peaks[lr.key].name
            if "t" in gpu.learners and (phase == TEACHER_PHASE or not lc.offload_idle):
                terms |= frozen
                if phase == TEACHER_PHASE:
                    terms |= frozen_forward(cfg, role)
            procs += gpu.learners.count("t")
            terms[OVERHEAD] = procs * PROCESS_OVERHEAD
            for label, b in terms.items():
                gpu.terms.setdefault(label, {})[phase] = b
        rank = {"v": 0, "G": 1, "D": 2}  # vLLM, G, D, then the overhead
        gpu.terms = dict(sorted(gpu.terms.items(), key=lambda t: rank.get(t[0][0], 3)))
    return phases, gpus


def frozen_model(cfg: Config, role: str) -> ModelSpec:
    model = spec(role).frozen_model(cfg)  # type: ignore[misc]
    assert model is not None, f"{role}: no model (its recipe's check)"
    return model


def frozen_resident(cfg: Config, role: str) -> dict[str, float]:
    """A rank of a frozen forward-only role (e.g. on-policy distillation's teacher,
    ``teacher_model``, docs/algorithms.md §7) between its forwards: the generator learner's
    weights (fp32 masters, ZeRO's compute copy) without Adam's state, which a learner that never
    steps does not allocate. With ``learner.offload_idle`` it waits on CPU outside its forward,
    which no phase here holds."""
    model, lc = frozen_model(cfg, role), cfg.learner
    sh, ranks = shape_of(model.path), spec(role).size(cfg)[0]
    backend = "fsdp" if lc.backend == "fsdp" else f"zero{lc.zero_stage}"
    lr = Learner(
        "T", "sft", ranks, sh.params, sh.params, sh.root_params, sh, compute_bytes(model), False,
        backend=backend,
    )  # fmt: skip
    name = spec(role).plan_label.removesuffix(" rank")
    states = resident(lr, cfg)
    return {
        k.replace("T ", f"T frozen {name} ", 1): b for k, b in states.items() if "Adam" not in k
    }


def frozen_forward(cfg: Config, role: str) -> dict[str, float]:
    """The frozen model's no-grad forward of the worst micro batch: its logits in the compute
    dtype and their fp32 log-softmax, ``tokens x vocab x (c + 4)`` (the layers' activations are
    freed as it goes)."""
    model = frozen_model(cfg, role)
    t, vocab, c = worst_micro_batch(cfg).tokens, shape_of(model.path).vocab, compute_bytes(model)
    return {f"T forward logits, {int(t)} tokens x {vocab} x ({c} + 4) B": t * vocab * (c + 4)}


def groups(gpus: list[GPU]) -> list[list[GPU]]:
    """GPUs with the same kinds of actors and the same estimates, in GPU order."""
    out: dict[Any, list[GPU]] = {}
    for gpu in gpus:
        key = (
            gpu.workers,
            tuple(gpu.learners),
            tuple(sorted((k, tuple(sorted(v.items()))) for k, v in gpu.terms.items())),
        )
        out.setdefault(key, []).append(gpu)
    return sorted(out.values(), key=lambda g: g[0].index)


def where(group: list[GPU]) -> str:
    return ("GPUs " if len(group) > 1 else "GPU ") + ranges([g.index for g in group])


def make_plan(cfg: Config) -> Plan:
    """The plan of a config: layout, per-GPU and per-node estimates, what does not fit (no
    Ray, no GPU)."""
    if cfg.cluster.gpus_per_node == 0:
        return Plan(cfg, (), [], [], [])
    phases, gpus = estimate(cfg)
    cap, problems = cfg.cluster.gpu_memory_gib * GiB, []
    for group in groups(gpus):
        for phase in phases:
            need = group[0].total(phase)
            if need > cap:
                problems.append(
                    f"{where(group)} {phase} needs {gib(need)} > {gib(cap)} "
                    f"(cluster.gpu_memory_gib): {_fixes(cfg, group[0].index, phase, need)}"
                )
    problems += _rollout_problems(cfg)
    hosts = host_by_node(cfg, layout(cfg))
    host_cap = cfg.cluster.host_memory_gib * GiB
    for node, terms in enumerate(hosts):
        need, phase = max((host_total(terms, p), p) for p in HOST_PHASES)
        if need > host_cap:
            problems.append(
                f"node {node} host memory ({phase}) needs {gib(need)} > {gib(host_cap)} "
                "(cluster.host_memory_gib): use nodes with more memory, more nodes "
                "(cluster.num_nodes), or fewer offloaded states (learner.offload_idle, "
                "learner.*_offload, rollout.sleep_when_idle)"
            )
    return Plan(cfg, phases, gpus, hosts, problems)


def check_fits(cfg: Config) -> None:
    """The real run's check before any actor starts: raise :class:`ConfigError` naming the GPU
    or node, the phase and the knobs when an estimate exceeds the cluster's memory."""
    if cfg.cluster.gpus_per_node == 0:
        return
    plan = make_plan(cfg)
    if plan.problems:
        raise ConfigError(
            "the run does not fit its GPUs or nodes (`gad-train <overrides> plan_only=true` "
            "prints the plan):\n  - " + "\n  - ".join(plan.problems)
        )


def _rollout_problems(cfg: Config) -> list[str]:
    r, d = cfg.rollout, cfg.data
    share, weights, kv = vllm_bytes(cfg)
    seq = d.max_prompt_length + d.max_response_length
    tokens = kv / kv_bytes_per_token(cfg)
    if tokens >= seq:
        return []
    return [
        f"rollout: a worker's KV cache holds {max(0, int(tokens))} tokens, less than one sequence "
        f"(data.max_prompt_length + data.max_response_length = {seq}), once its share "
        f"({gib(share)}) holds the weights ({gib(weights)} per GPU) and 2 GiB of "
        f"runtime: raise rollout.gpu_memory_utilization (now {r.gpu_memory_utilization}) or "
        f"rollout.tensor_parallel_size (now {r.tensor_parallel_size})"
    ]


def _candidates(cfg: Config) -> list[tuple[str, Any]]:
    """Single knob changes that lower memory, to try when a GPU does not fit."""
    lc, r, d = cfg.learner, cfg.rollout, cfg.data
    out: list[tuple[str, Any]] = []
    if not lc.offload_idle:
        out.append(("learner.offload_idle", True))
    if not r.sleep_when_idle:
        out.append(("rollout.sleep_when_idle", True))
    if lc.max_tokens_per_micro_batch:
        half = lc.max_tokens_per_micro_batch // 2
        if half >= d.max_prompt_length + d.max_response_length:
            out.append(("learner.max_tokens_per_micro_batch", half))
    elif lc.micro_batch_size > 1:
        out.append(("learner.micro_batch_size", lc.micro_batch_size // 2))
    for who in ("student", "discriminator"):
        if not getattr(cfg.model, who).gradient_checkpointing:
            out.append((f"model.{who}.gradient_checkpointing", True))
    if any(lr.reference for lr in learners(cfg)) and not lc.reference_offload:
        out.append(("learner.reference_offload", True))
    if not lc.optimizer_offload:
        out.append(("learner.optimizer_offload", True))
    if r.gpu_memory_utilization > 0.3:
        out.append(("rollout.gpu_memory_utilization", round(r.gpu_memory_utilization - 0.2, 2)))
    return out


def with_override(cfg: Config, key: str, value: Any) -> Config:
    """``cfg`` with the dotted ``key`` set to ``value``, validated (ValidationError or
    ConfigError if invalid)."""
    raw = cfg.model_dump()
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return check_config(Config.model_validate(raw))


def _fixes(cfg: Config, gpu: int, phase: str, need: float) -> str:
    cap, found = cfg.cluster.gpu_memory_gib * GiB, []
    for key, value in _candidates(cfg):
        try:
            after = next(g for g in estimate(with_override(cfg, key, value))[1] if g.index == gpu)
        except (ValidationError, ConfigError):
            continue
        if after.total(phase) < need:
            value = str(value).lower() if isinstance(value, bool) else value
            found.append((after.total(phase), f"{key}={value}"))
    if not found:
        return "no single knob helps; use more GPUs (cluster.num_nodes) or a smaller model"
    found.sort()
    fits = [f"set {k} (-> {gib(b)})" for b, k in found if b <= cap]
    if fits:
        return " or ".join(fits[:3])
    return "none fits alone; combine " + ", ".join(f"{k} (-> {gib(b)})" for b, k in found[:3])
