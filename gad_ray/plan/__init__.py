"""Will it fit? The GPUs each actor lands on and their peak memory per phase, before any start.

``gad-train <overrides> plan_only=true`` prints, per GPU, the actors placed on it (by
:func:`gad_ray.placement.pool`, the run's own placement logic, also checked by creating the
run's placement group on Ray's logical GPUs) and an estimate of its peak memory in each phase
of a step: ``generate`` (vLLM awake), ``D update``, ``G update``. When an estimate exceeds
``cluster.gpu_memory_gib`` it exits 2 naming the knobs that would make it fit; a real run makes
the same check before any actor starts (:func:`check_fits`). Model shapes come from
:mod:`gad_ray.models.shapes` (shipped for the preset models: no hub, no GPU needed).

Memory model, per GPU and phase. N: a learner's ranks, P: its parameters, c: bytes of the
compute dtype (``model.*.dtype``: 2 for bf16 and ``auto`` on GPU; 4 for ``float32``),
T: tokens per micro batch (``learner.max_tokens_per_micro_batch``, else ``micro_batch_size`` x
(max prompt + max response)); h, L, i, V: hidden size, layers, MLP width, vocabulary.

- Sharded states: fp32 master weights 4P/N, AdamW's m and v 8P/N, fp32 gradients 4P/N (only in
  the learner's own update; freed after each step). FSDP2 and ZeRO-2/3 shard all three (ZeRO's
  fp32 master lives in its partitioned optimizer). On CPU, 0 here, with ``learner.param_offload``
  or ``optimizer_offload`` (FSDP2) or ``optimizer_offload`` (DeepSpeed).
- DeepSpeed's compute-dtype weights: cP/N at ZeRO-3 (0 with ``param_offload``), cP at ZeRO-2.
- The frozen KL reference (GRPO): cP/N (cP under ZeRO-2); 0 with ``learner.reference_offload``.
- Gathered weights in a learner's own update: FSDP2 all-gathers a unit at a time in the compute
  dtype; the root unit (embeddings, LM head, final norm; D's scalar head) stays gathered through
  forward and backward and one decoder layer is prefetched while another runs: c (root + 2
  layers), for the policy and again for the reference. ZeRO-2: 0 (the weights are whole).
- Unsharded gradients of those units before their reduce-scatter: (c + 4)(root + 2 layers), the
  compute-dtype gradient and its fp32 copy for the fp32 reduction (4 alone in fp32).
- Activations of one micro batch. Per token and layer the backward keeps (8 + 8c)h + 4ci bytes:
  each RMSNorm's fp32 input (4h), normalised input (ch) and output (ch); q, k, v at full width
  (HF's SDPA path repeats the GQA heads under a padding mask) and the attention output (4ch);
  gate, up, SiLU(gate) and their product (4ci). Gradient checkpointing keeps each layer's input
  (Lch) plus one layer recomputed in the backward; without it, all L layers. Plus the final
  norm's (4 + 2c)h. Times T. (One layer's transient gradients in the backward are not counted.)
- Logits, G only (D's head is a scalar): TV bytes x 12 in a GRPO step: the bf16 logits (2), the
  bf16 copy flattening the shifted logits makes (2), the fp32 chunks the log-softmax keeps for
  the backward (4); the reference's no-grad pass (its logits and copy, 4) runs while the
  policy's 8 are held. The entropy metric is computed without a graph (a chunk at a time);
  with ``algorithm.grpo.entropy_coef`` != 0 it is in the loss and keeps 8 more (fp32 chunks and
  softmax): x 16. x 8 in an SFT step (2 + 2 + 4).
- vLLM: ``rollout.gpu_memory_utilization`` x GPU memory while awake (weights, KV cache,
  activations, CUDA graphs; with ``rollout.kv_cache_memory_bytes``: weights + that + 2 GiB); 0
  asleep (sleep level 1 moves the weights to CPU, drops the KV cache), as it is in the learner
  phases with ``rollout.sleep_when_idle``. Its KV cache is the share less the weights / tp and
  2 GiB of runtime; less than one sequence is an error.
- ``learner.offload_idle``: outside its own update a learner holds nothing on GPU; its states
  wait in host memory (printed per node, with vLLM's sleeping weights).
- 1.5 GiB per process on the GPU (CUDA context ~0.5 GiB, NCCL and cuBLAS workspaces, allocator
  fragmentation); an awake vLLM's is inside its share.

LoRA learners (``model.*.lora.rank`` > 0): the terms of :mod:`gad_ray.plan.lora`.

The terms are summed as if they all peaked at once, an upper bound; a token budget bounds the
tokens computed, padding included (rows x longest row, or the packed length: docs/placement.md).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gad_ray import recipes
from gad_ray.config.schema import Config, ConfigError
from gad_ray.models.shapes import ModelShape, model_shape
from gad_ray.placement import pool, role_sizes
from gad_ray.plan.lora import adapter_params, lora_resident, lora_update

GiB = 2**30
PROCESS_OVERHEAD = 1.5 * GiB  # per process holding a GPU
VLLM_RUNTIME = 2 * GiB  # inside vLLM's share, besides weights and KV cache
PHASES = ("generate", "D update", "G update")
OVERHEAD = "CUDA context, NCCL, allocator: 1.5 GiB per process"

OFFLOAD_KNOBS = ("offload_idle", "param_offload", "optimizer_offload", "reference_offload")
_QUIET_RAY = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}

_shape = functools.lru_cache(maxsize=None)(model_shape)


@dataclass(frozen=True)
class Learner:
    """What the memory model needs of one learner role."""

    key: str  # "G" | "D"
    phase: str  # its update phase
    ranks: int
    params: int
    unit: int  # parameters gathered at once: root + 2 decoder layers
    shape: ModelShape
    c: int  # bytes of the compute dtype
    checkpointing: bool
    logits: int  # bytes per token and vocabulary entry (0: no LM head)
    reference: bool
    adapter: int = 0  # LoRA: trained adapter (+ head) parameters; 0: full fine-tuning
    shared: bool = False  # learner.shared_base: G and D are one group on one base (G holds it)


@dataclass
class GPU:
    """One GPU: its actors and, per term, its bytes in each phase."""

    index: int
    node: int
    actors: list[str] = field(default_factory=list)
    workers: int = 0  # vLLM workers with a shard here
    learners: list[str] = field(default_factory=list)  # keys of the learners with a rank here
    terms: dict[str, dict[str, float]] = field(default_factory=dict)

    def total(self, phase: str) -> float:
        return sum(t.get(phase, 0.0) for t in self.terms.values())


@dataclass
class Plan:
    """A config's plan: the phases, every GPU's estimate, what to print, what does not fit."""

    cfg: Config
    phases: tuple[str, ...]
    gpus: list[GPU]
    header: list[str]
    notes: list[str]
    problems: list[str]

    @property
    def capacity(self) -> float:
        return self.cfg.cluster.gpu_memory_gib * GiB


# ---------------------------------------------------------------------------------------------
# the memory model


def compute_bytes(cfg: Config, dtype: str) -> int:
    """Bytes of the compute dtype on GPU: 4 for ``float32``, else 2 (``auto`` is bf16)."""
    return 4 if dtype == "float32" else 2


def micro_batch_tokens(cfg: Config) -> int:
    lc, d = cfg.learner, cfg.data
    if lc.max_tokens_per_micro_batch:
        return lc.max_tokens_per_micro_batch
    return lc.micro_batch_size * (d.max_prompt_length + d.max_response_length)


def activation_bytes(shape: ModelShape, c: int, tokens: int, checkpointing: bool) -> int:
    """Activations the backward of one micro batch keeps (module docstring)."""
    h, i = shape.hidden, shape.intermediate
    layer = (8 + 8 * c) * h + 4 * c * i
    final = (4 + 2 * c) * h
    if checkpointing:
        return tokens * (shape.layers * c * h + layer + final)
    return tokens * (shape.layers * layer + final)


def plan_roles(cfg: Config) -> tuple[str, ...]:
    """The roles the plan lays out: the algorithm's largest set of roles that trains the
    student (``generator``) at one time."""
    sets = [rs for rs in recipes.build(cfg).role_sets() if "generator" in rs]
    return max(sets, key=len)


def learners(cfg: Config) -> list[Learner]:
    """The generator and (when the algorithm has one) the discriminator, as the memory model
    sees them; G's update is GRPO when it holds a KL reference, else SFT."""
    lc, s, d = cfg.learner, cfg.model.student, cfg.model.discriminator
    rec = recipes.build(cfg)
    grpo = bool(rec.roles.get("generator", {}).get("with_reference"))
    has_d = "discriminator" in plan_roles(cfg)
    sh = _shape(s.path)
    dh = sh if d.path == "student" else _shape(d.path)

    shared = lc.shared_base and has_d

    def one(key, ranks, params, root, shape, spec, logits, ref) -> Learner:
        unit = root + 2 * shape.layer_params
        c, ckpt = compute_bytes(cfg, spec.dtype), spec.gradient_checkpointing
        a = adapter_params(shape, spec.lora) + (shape.hidden if key == "D" else 0)
        a = a if spec.lora.enabled else 0
        args = (ranks, params, unit, shape, c, ckpt, logits, ref, a, shared)
        return Learner(key, f"{key} update", *args)

    logits = (16 if cfg.algorithm.grpo.entropy_coef else 12) if grpo else 8
    g = one("G", lc.generator_ranks, sh.params, sh.root_params, sh, s, logits, grpo)
    if not has_d:
        return [g]
    d_args = (dh.discriminator_params, dh.discriminator_root_params, dh, d, 0, False)
    return [g, one("D", lc.discriminator_ranks, *d_args)]


def _resident(lr: Learner, cfg: Config) -> dict[str, float]:
    """What a learner rank holds on GPU between steps (unless ``learner.offload_idle``)."""
    lc, k, n, p, c = cfg.learner, lr.key, lr.ranks, lr.params, lr.c
    ds, zero2 = lc.backend == "deepspeed", lc.backend == "deepspeed" and lc.zero_stage == 2
    if lr.adapter:
        holds = not (lr.shared and k == "D")
        return lora_resident(k, n, p, lr.adapter, c, lr.reference, holds, zero2)
    per = f"{_count(p)} / {n}"
    out = {}
    if not (lc.optimizer_offload or (lc.param_offload and not ds)):
        out[f"{k} fp32 master weights, 4 B x {per}"] = 4 * p / n
        out[f"{k} Adam m and v, 8 B x {per}"] = 8 * p / n
    if ds and not (lc.param_offload and not zero2):
        out[
            f"{k} ZeRO-{lc.zero_stage} weights, {c} B x {_count(p)}" + ("" if zero2 else f" / {n}")
        ] = c * p if zero2 else c * p / n
    if lr.reference and not lc.reference_offload:
        out[f"{k} KL reference, {c} B x {per}"] = c * p if zero2 else c * p / n
    return out


def _update(lr: Learner, cfg: Config, tokens: int) -> dict[str, float]:
    """What a learner rank adds on GPU during its own update."""
    lc, k, n, p, c = cfg.learner, lr.key, lr.ranks, lr.params, lr.c
    ds, zero2 = lc.backend == "deepspeed", lc.backend == "deepspeed" and lc.zero_stage == 2
    out = {}
    if lr.adapter:
        out = lora_update(k, n, lr.adapter, c, lr.unit, lr.shape.layers, zero2)
    elif not (lc.optimizer_offload or (lc.param_offload and not ds)):
        out[f"{k} fp32 gradients, 4 B x {_count(p)} / {n}"] = 4 * p / n
    if not zero2 and not lr.adapter:
        copies = 2 if lr.reference else 1
        what = ", + reference" if lr.reference else ""
        out[f"{k} gathered weights, {c} B x (root + 2 layers){what}"] = c * lr.unit * copies
    g = c + 4 if c < 4 else 4
    if not lr.adapter:
        out[f"{k} unsharded gradients, {g} B x (root + 2 layers)"] = g * lr.unit
    how = "checkpointed" if lr.checkpointing else "no checkpointing"
    out[f"{k} activations, {tokens} tokens, {how}"] = activation_bytes(
        lr.shape, c, tokens, lr.checkpointing
    )
    if lr.logits:
        out[f"{k} logits, {tokens} x {lr.shape.vocab} x {lr.logits} B"] = (
            tokens * lr.shape.vocab * lr.logits
        )
    return out


def learner_bytes(lr: Learner, phase: str, cfg: Config, tokens: int) -> dict[str, float]:
    """A learner rank's terms on its GPU in ``phase``."""
    own = phase == lr.phase
    # a shared-base group is onloaded, base and both adapters, in either learner's update
    held = own or (lr.shared and phase in ("D update", "G update"))
    out = {} if cfg.learner.offload_idle and not held else _resident(lr, cfg)
    return out | (_update(lr, cfg, tokens) if own else {})


def vllm_bytes(cfg: Config) -> tuple[float, float, float]:
    """Per GPU of an awake rollout worker: (its share, bf16 weights, KV cache) in bytes."""
    r, sh, lora = cfg.rollout, _shape(cfg.model.student.path), cfg.model.student.lora
    c = 4 if cfg.model.student.dtype == "float32" else 2
    weights = c * (sh.params + adapter_params(sh, lora)) / r.tensor_parallel_size  # + 1 adapter
    if r.kv_cache_memory_bytes:
        return weights + r.kv_cache_memory_bytes + VLLM_RUNTIME, weights, r.kv_cache_memory_bytes
    share = r.gpu_memory_utilization * cfg.cluster.gpu_memory_gib * GiB
    return share, weights, share - weights - VLLM_RUNTIME


def kv_bytes_per_token(cfg: Config) -> int:
    """K and V of every layer for one token, on one GPU of a worker (KV heads split over tp)."""
    sh, tp = _shape(cfg.model.student.path), cfg.rollout.tensor_parallel_size
    c = 4 if cfg.model.student.dtype == "float32" else 2
    return 2 * sh.layers * math.ceil(sh.kv_heads / tp) * sh.dh * c


# ---------------------------------------------------------------------------------------------
# layout and the plan


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
    names = {
        "rollout": "vLLM worker",
        "generator": "G rank",
        "discriminator": "D rank",
        "proxy_frozen": "proxy rank",
    }
    for role, actors in layout(cfg).items():
        for i, on in enumerate(actors):
            for j, g in enumerate(on):
                shard = f" (tp shard {j + 1}/{len(on)})" if len(on) > 1 else ""
                gpus[g].actors.append(f"{names[role]} {i}{shard}")
                if role == "rollout":
                    gpus[g].workers += 1
                else:
                    gpus[g].learners.append(names[role][0])
    tokens, share = micro_batch_tokens(cfg), vllm_bytes(cfg)[0]
    r = cfg.rollout
    vllm = f"vLLM awake, {r.gpu_memory_utilization} x {cfg.cluster.gpu_memory_gib:g} GiB"
    if r.kv_cache_memory_bytes:
        vllm = "vLLM awake, weights + rollout.kv_cache_memory_bytes + 2 GiB"
    for gpu in gpus:
        for phase in phases:
            procs, terms = 0, {}
            if gpu.workers and (phase == "generate" or not r.sleep_when_idle):
                terms[vllm] = gpu.workers * share
            else:
                procs += gpu.workers
            for lr in lrs:
                if lr.key in gpu.learners:
                    procs += not (lr.shared and lr.key == "D")  # one process for both
                    terms |= learner_bytes(lr, phase, cfg, tokens)
            terms[OVERHEAD] = procs * PROCESS_OVERHEAD
            for label, b in terms.items():
                gpu.terms.setdefault(label, {})[phase] = b
        rank = {"v": 0, "G": 1, "D": 2}  # vLLM, G, D, then the overhead
        gpu.terms = dict(sorted(gpu.terms.items(), key=lambda t: rank.get(t[0][0], 3)))
    return phases, gpus


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


def make_plan(cfg: Config) -> Plan:
    """The plan of a config: layout, per-GPU estimates, and what does not fit (no Ray, no GPU)."""
    if cfg.cluster.gpus_per_node == 0:
        sizes = role_sizes(cfg, plan_roles(cfg))
        header = [
            f"Plan: {cfg.name} on a CPU-only cluster (cluster.gpus_per_node=0): "
            + ", ".join(f"{n} {role}" for role, (n, _) in sizes.items())
            + " actors share the node's cores; no GPU memory to plan."
        ]
        return Plan(cfg, (), [], header, [], [])
    phases, gpus = estimate(cfg)
    cap = cfg.cluster.gpu_memory_gib * GiB
    problems = []
    for group in groups(gpus):
        for phase in phases:
            need = group[0].total(phase)
            if need > cap:
                problems.append(
                    f"{_where(group)} {phase} needs {_gib(need)} > {_gib(cap)} "
                    f"(cluster.gpu_memory_gib): {_fixes(cfg, group[0].index, phase, need)}"
                )
    problems += _rollout_problems(cfg)
    return Plan(cfg, phases, gpus, _header(cfg), _notes(cfg, phases, gpus), problems)


def check_fits(cfg: Config) -> None:
    """The real run's check before any actor starts: raise :class:`ConfigError` naming the GPU,
    the phase and the knobs when an estimate exceeds ``cluster.gpu_memory_gib``."""
    if cfg.cluster.gpus_per_node == 0:
        return
    plan = make_plan(cfg)
    if plan.problems:
        raise ConfigError(
            "the run does not fit its GPUs (`gad-train <overrides> plan_only=true` prints the "
            "plan):\n  - " + "\n  - ".join(plan.problems)
        )


def _rollout_problems(cfg: Config) -> list[str]:
    r, d = cfg.rollout, cfg.data
    _, weights, kv = vllm_bytes(cfg)
    seq = d.max_prompt_length + d.max_response_length
    tokens = kv / kv_bytes_per_token(cfg)
    if tokens >= seq:
        return []
    return [
        f"rollout: a worker's KV cache holds {max(0, int(tokens))} tokens, less than one sequence "
        f"(data.max_prompt_length + data.max_response_length = {seq}), once its share "
        f"({_gib(vllm_bytes(cfg)[0])}) holds the weights ({_gib(weights)} per GPU) and 2 GiB of "
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
    """``cfg`` with the dotted ``key`` set to ``value``, validated (ValidationError if invalid)."""
    raw = cfg.model_dump()
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return Config.model_validate(raw)


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
    fits = [f"set {k} (-> {_gib(b)})" for b, k in found if b <= cap]
    if fits:
        return " or ".join(fits[:3])
    return "none fits alone; combine " + ", ".join(f"{k} (-> {_gib(b)})" for b, k in found[:3])


# ---------------------------------------------------------------------------------------------
# printing


def _n(k: int, what: str) -> str:
    return f"{k} {what}{'' if k == 1 else 's'}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB"


def _ranges(idx: list[int]) -> str:
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def _where(group: list[GPU]) -> str:
    return ("GPUs " if len(group) > 1 else "GPU ") + _ranges([g.index for g in group])


def _header(cfg: Config) -> list[str]:
    c, lc, r = cfg.cluster, cfg.learner, cfg.rollout
    backend = "FSDP2" if lc.backend == "fsdp" else f"DeepSpeed ZeRO-{lc.zero_stage}"
    out = [
        f"Plan: {cfg.name} (algorithm={cfg.algorithm.name}), {_n(c.num_nodes, 'node')} x "
        f"{_n(c.gpus_per_node, 'GPU')} of {c.gpu_memory_gib:g} GiB, cluster.placement={c.placement}"
    ]
    for lr in learners(cfg):
        sh, d = lr.shape, cfg.model.discriminator.path
        what = cfg.model.student.path if lr.key == "G" else "the student's backbone + scalar head"
        what = d if lr.key == "D" and d != "student" else what
        spec = (cfg.model.student if lr.key == "G" else cfg.model.discriminator).lora
        trained = "fp32 master weights + AdamW"
        if lr.adapter:
            shared_d = lr.shared and lr.key == "D"
            on = "G's base (learner.shared_base)" if shared_d else "a frozen base"
            trained = f"LoRA r={spec.rank} on {on}: {_count(lr.adapter)} fp32 masters + AdamW"
        out += [
            f"  {lr.key}: {what}, {_count(lr.params)} params ({sh.layers} layers, hidden "
            f"{sh.hidden}, vocab {sh.vocab})",
            f"     {_n(lr.ranks, backend + ' rank')}, {'bf16' if lr.c == 2 else 'fp32'} compute, "
            f"{trained}, gradient checkpointing {'on' if lr.checkpointing else 'off'}",
        ]
    knobs = "".join(f", learner.{k}=true" for k in OFFLOAD_KNOBS if getattr(lc, k))
    by = "max_tokens_per_micro_batch" if lc.max_tokens_per_micro_batch else "micro_batch_size"
    out.append(f"  micro batches of {micro_batch_tokens(cfg)} tokens (learner.{by}){knobs}")
    share, weights, kv = vllm_bytes(cfg)
    sleeps = "asleep while the learners train" if r.sleep_when_idle else "awake throughout"
    out += [
        f"  vLLM: {_n(r.num_workers, 'worker')} x tp {r.tensor_parallel_size}, {_gib(share)} per "
        f"GPU awake: weights {_gib(weights)}, KV cache {_gib(max(kv, 0))}",
        f"     = {kv / kv_bytes_per_token(cfg) / 1e3:.0f}K tokens per worker; {sleeps}",
    ]
    return out


def _notes(cfg: Config, phases: tuple[str, ...], gpus: list[GPU]) -> list[str]:
    tokens, out = micro_batch_tokens(cfg), []
    lrs = learners(cfg)
    full = [
        f"{lr.key} {_gib(activation_bytes(lr.shape, lr.c, tokens, False))}"
        for lr in lrs
        if lr.checkpointing
    ]
    if full:
        out.append(f"Activations without gradient checkpointing: {', '.join(full)}.")
    if any(r.startswith("proxy") for rs in recipes.build(cfg).role_sets() for r in rs):
        out.append("The proxy learner and its rollout workers are not in this plan.")
    host = _host_bytes(cfg, phases, gpus, lrs)
    if host:
        out.append(
            f"Host memory per node, at most {_gib(max(host))} (offloaded learner states, "
            "sleeping vLLM weights)."
        )
    return out


def _host_bytes(cfg: Config, phases, gpus: list[GPU], lrs: list[Learner]) -> list[float]:
    """Per node, the most host memory the offloaded states and sleeping vLLM weights take."""
    lc, r = cfg.learner, cfg.rollout
    nodes = [dict.fromkeys(phases, 0.0) for _ in range(cfg.cluster.num_nodes)]
    weights = vllm_bytes(cfg)[1]
    for gpu in gpus:
        for phase in phases:
            if gpu.workers and phase != "generate" and r.sleep_when_idle:
                nodes[gpu.node][phase] += gpu.workers * weights
            for lr in lrs:
                if lr.key not in gpu.learners:
                    continue
                n, p, own = lr.ranks, lr.params, phase == lr.phase
                cpu = lc.optimizer_offload or (lc.param_offload and lc.backend == "fsdp")
                b = (12 + 4 * own) * p / n if cpu else 0.0
                if lr.reference and lc.reference_offload:
                    b += lr.c * p / n
                if lc.offload_idle and not own:
                    b += sum(_resident(lr, cfg).values())
                nodes[gpu.node][phase] += b
    return [max(n.values()) for n in nodes if max(n.values()) > 0]
