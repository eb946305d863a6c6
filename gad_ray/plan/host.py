"""Host memory per node: loading, pinned offload buffers, vLLM's sleeping weights.

Two moments per node (docs/plan.md), each checked against ``cluster.host_memory_gib``:

- ``loading``: the roles start one after another; one process per learner group (its global
  rank 0) reads the weights into host memory and sends the other ranks their shards: the
  trained model as fp32 masters (4 B per parameter; LoRA: the frozen base in the compute
  dtype) and G's KL reference in the compute dtype. The largest such read on the node.
- ``training``: what stays in host memory once the run is going, in every phase:
  ``learner.offload_idle`` moves each idle rank's states (fp32 master shards, AdamW's m and v,
  the reference's shard; LoRA: the base's shard and the adapters) to pinned host memory, and
  torch's pinned allocator rounds every block up to a power of two and keeps freed blocks
  cached (the process holds them for good); vLLM's sleep (level 1) backs its weights up in
  pinned memory the same way (one block per CUDA allocation: tensors of 10 MiB or more on their
  own, rounded to 2 MiB; smaller ones share 2 MiB and 20 MiB segments); ``learner.
  param_offload`` / ``optimizer_offload`` / ``reference_offload`` keep states on CPU for good
  (FSDP2 pins the parameter and gradient shards; AdamW's state is plain memory; DeepSpeed pins
  flat partitions).

Both add an allowance of 2 GiB per process on the node (libraries, CUDA's host state, the
driver's data and caches): an allowance, not a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from gad_ray.config.schema import Config
from gad_ray.models.shapes import ModelShape
from gad_ray.plan.learners import compute_bytes, learners, shape_of
from gad_ray.plan.step import Learner
from gad_ray.plan.units import GiB, count

PROCESS = 2 * GiB  # host allowance per process
MiB = 2**20
HOST_PHASES = ("loading", "training")


def pinned(nbytes: float) -> float:
    """A pinned host block: torch's caching host allocator rounds up to a power of two."""
    return 0.0 if nbytes <= 0 else float(2 ** math.ceil(math.log2(nbytes)))


def tensors(shape: ModelShape, discriminator: bool = False) -> Iterator[tuple[int, int]]:
    """(rows, columns) of every parameter tensor of a Qwen2 / Llama decoder (D: no LM head, a
    ``Linear(h, 1)`` head)."""
    h, q, kv, i = shape.hidden, shape.heads * shape.dh, shape.kv_dim, shape.intermediate
    layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i), (h, 1), (h, 1)]
    if shape.qkv_bias:
        layer += [(q, 1), (kv, 1), (kv, 1)]
    if shape.o_bias:
        layer += [(h, 1)]
    for _ in range(shape.layers):
        yield from layer
    yield from [(shape.vocab, h), (h, 1)]
    if discriminator:
        yield (1, h)
    elif not shape.tied:
        yield (shape.vocab, h)


def sharded_pinned(shape: ModelShape, ranks: int, nbytes: int, discriminator: bool) -> float:
    """Pinned host bytes of one rank's FSDP2 shards (rows split over ranks) at ``nbytes`` each."""
    return sum(pinned(math.ceil(r / ranks) * c * nbytes) for r, c in tensors(shape, discriminator))


def _vllm_backup(cfg: Config) -> float:
    """Pinned backup of one vLLM worker GPU's weights while it sleeps (module docstring)."""
    sh, tp = shape_of(cfg.model.student.path), cfg.rollout.tensor_parallel_size
    c, h = compute_bytes(cfg.model.student), sh.hidden
    q, kv, i = sh.heads * sh.dh, sh.kv_dim, sh.intermediate
    layer = [(q + 2 * kv) * h, h * q, 2 * i * h, h * i]  # qkv, o, gate_up, down (fused)
    sizes = [c * s / tp for s in layer] * sh.layers + [c * sh.vocab * h / tp]
    sizes += [] if sh.tied else [c * sh.vocab * h / tp]
    small = c * (sh.layers * (2 * h + q + 2 * kv) + h)  # norms, biases: shared 2 MiB segments
    big = sum(pinned(math.ceil(s / (2 * MiB)) * 2 * MiB) for s in sizes if s >= 10 * MiB)
    mid = sum(s for s in sizes if s < 10 * MiB)
    return big + math.ceil(mid / (20 * MiB)) * 32 * MiB + math.ceil(small / (2 * MiB)) * 2 * MiB


def _loads(lr: Learner, cfg: Config) -> dict[str, float]:
    """What the loading process of a learner group reads into host memory."""
    k, p = lr.key, lr.params
    if not lr.full:
        if lr.shared and k == "D":
            return {}
        what = "G and D's" if lr.shared else f"{k}'s"
        return {f"{what} loading process reads the base ({lr.c} B x {count(p)})": lr.c * p}
    out = {f"{k}'s loading process reads fp32 masters (4 B x {count(p)})": 4 * p}
    if lr.reference:
        out[f"G's loading process reads the KL reference ({lr.c} B x {count(p)})"] = lr.c * p
    return out


def _kept(lr: Learner, cfg: Config) -> dict[str, float]:
    """A learner rank's host bytes while training (module docstring)."""
    lc, k, n, c = cfg.learner, lr.key, lr.ranks, lr.c
    d, sh, fsdp = k == "D", lr.shape, lr.backend == "fsdp"
    shards = lambda b: sharded_pinned(sh, n, b, d)  # noqa: E731
    flat = lambda b, x=n: pinned(b * lr.params / x)  # noqa: E731  DeepSpeed's flat partitions
    out: dict[str, float] = {}
    if not lr.full:
        if lc.offload_idle:
            base = 0.0 if lr.shared and d else (shards(c) if fsdp else flat(c))
            out[f"{k} idle base + adapters (learner.offload_idle)"] = base + 2 * 16 * lr.trained / n
        return out
    cpu_params = lc.param_offload and fsdp
    if lc.optimizer_offload or cpu_params:  # FSDP2 CPUOffloadPolicy / ZeRO offload_optimizer
        if fsdp:
            b = shards(4) * 2 + 8 * lr.params / n  # pinned params and grads; Adam's m, v
        else:
            b = 4 * flat(4)
        out[f"{k} states on CPU (learner.param_offload / optimizer_offload)"] = b
    elif lc.offload_idle:
        b = shards(4) * 3 if fsdp else 3 * flat(4) + flat(4)
        if not fsdp:
            b += flat(c, 1 if lr.backend == "zero2" else n)
        out[f"{k} idle masters + Adam m + v (learner.offload_idle)"] = b
    if lr.reference and (lc.reference_offload or lc.offload_idle):
        whole = lr.backend == "zero2"
        b = shards(c) if fsdp else flat(c, 1 if whole else n)
        out[f"{k} idle KL reference ({c} B)"] = b
    return out


def host_by_node(
    cfg: Config, actors: dict[str, list[tuple[int, ...]]]
) -> list[dict[str, dict[str, float]]]:
    """Per node, per term, its bytes in each of :data:`HOST_PHASES`; ``actors``: per role, the
    GPUs of each actor (:func:`gad_ray.plan.layout`)."""
    gpn = cfg.cluster.gpus_per_node
    nodes: list[dict[str, dict[str, float]]] = [{} for _ in range(cfg.cluster.num_nodes)]
    procs = [0] * cfg.cluster.num_nodes
    procs[0] += 1  # the driver
    loads: list[dict[str, float]] = [{} for _ in nodes]
    role = {"G": "generator", "D": "discriminator"}
    for lr in learners(cfg):
        if lr.shared and lr.key == "D":
            continue  # one process serves both roles
        on = [gpus[0] // gpn for gpus in actors.get(role[lr.key], [])]
        load = _loads(lr, cfg)
        if on and sum(load.values()) > sum(loads[on[0]].values()):
            loads[on[0]] = load  # the groups load one after another: the largest read counts
        for node in set(on):
            m = on.count(node)
            procs[node] += m
            for label, b in _kept(lr, cfg).items():
                nodes[node][f"{label}: {m} x {b / GiB:.2f} GiB pinned"] = {"training": m * b}
    shards = [0] * len(nodes)  # vLLM workers' GPUs per node
    for gpus in actors.get("rollout", []):
        shards[gpus[0] // gpn] += len(gpus)
    for node, m in enumerate(shards):
        procs[node] += m
        if m and cfg.rollout.sleep_when_idle:
            b = _vllm_backup(cfg)
            label = f"vLLM sleeping weights: {m} x {b / GiB:.2f} GiB pinned"
            nodes[node][label] = {"training": m * b}
    for node, load, n in zip(nodes, loads, procs, strict=True):
        node |= {label: {"loading": b} for label, b in load.items()}
        node[f"processes: {n} x 2 GiB allowance"] = {p: n * PROCESS for p in HOST_PHASES}
    return nodes


def host_total(node: dict[str, dict[str, float]], phase: str) -> float:
    return sum(t.get(phase, 0.0) for t in node.values())
