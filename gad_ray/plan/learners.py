"""The learners and vLLM workers as the memory plan sees them: resident states, a step's peak.

Per learner rank, N ranks, P parameters, c bytes of the compute dtype (``model.*.dtype``: 2 for
bf16 and ``auto`` on GPU, 4 for ``float32`` and ``auto`` on CPU):

- between steps (:func:`resident`): fp32 master weights 4P/N and AdamW's m and v 8P/N (FSDP2 and
  ZeRO-2/3 shard them; 0 with ``learner.optimizer_offload``, or ``param_offload`` on FSDP2);
  DeepSpeed's compute-dtype weights cP/N at ZeRO-3 (0 with ``param_offload``), cP at ZeRO-2;
  G's frozen KL reference cP/N (cP under ZeRO-2; 0 with ``learner.reference_offload``); LoRA:
  the terms of :mod:`gad_ray.plan.lora`. ``learner.offload_idle``: none outside the learner's
  own update (they wait in pinned host memory, :mod:`gad_ray.plan.host`).
- in its own update: the largest moment of its step (:mod:`gad_ray.plan.step`) for the
  largest micro batch the budget allows (:func:`worst_micro_batch`).

:func:`learner_step` gives both for given micro batches, on GPU or CPU: the per-phase figure
that ``tests/plan/test_measured.py`` and ``bench/gpu_check.py`` compare with measured peaks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from gad_ray import recipes
from gad_ray.config.schema import Config, ModelSpec
from gad_ray.data.batch import TokenBatch
from gad_ray.models.shapes import model_shape
from gad_ray.plan.lora import adapter_params, lora_resident
from gad_ray.plan.step import Attention, Kind, Learner, MicroBatch, Moment, step_peak
from gad_ray.plan.units import count

shape_of = functools.lru_cache(maxsize=None)(model_shape)
VLLM_RUNTIME = 2 * 2**30  # inside vLLM's share, besides weights and KV cache


def compute_bytes(spec: ModelSpec, cuda: bool = True) -> int:
    """Bytes of the compute dtype: 4 for ``float32`` (and ``auto`` on CPU), else 2."""
    return 4 if spec.dtype == "float32" or (spec.dtype == "auto" and not cuda) else 2


def plan_roles(cfg: Config) -> tuple[str, ...]:
    """The roles the plan lays out: the algorithm's largest set of roles that trains the
    student (``generator``) at one time."""
    sets = [rs for rs in recipes.build(cfg).role_sets() if "generator" in rs]
    return max(sets, key=len)


def learners(cfg: Config, cuda: bool = True) -> list[Learner]:
    """The generator and (when the algorithm has one) the discriminator; G's update is GRPO
    when it holds a KL reference, else SFT."""
    lc, s, d = cfg.learner, cfg.model.student, cfg.model.discriminator
    grpo = bool(recipes.build(cfg).roles.get("generator", {}).get("with_reference"))
    has_d = "discriminator" in plan_roles(cfg)
    sh = shape_of(s.path)
    dh = sh if d.path == "student" else shape_of(d.path)
    backend = "fsdp" if lc.backend == "fsdp" else f"zero{lc.zero_stage}"
    common = dict(backend=backend, shared=lc.shared_base and has_d)

    def trained(spec: ModelSpec, shape, params: int, head: int) -> int:
        return adapter_params(shape, spec.lora) + head if spec.lora.enabled else params

    g = Learner(
        "G",
        "grpo" if grpo else "sft",
        lc.generator_ranks,
        sh.params,
        trained(s, sh, sh.params, 0),
        sh.root_params,
        sh,
        compute_bytes(s, cuda),
        s.gradient_checkpointing,
        reference=grpo,
        entropy_grad=grpo and bool(cfg.algorithm.grpo.entropy_coef),
        **common,
    )
    if not has_d:
        return [g]
    dp = dh.discriminator_params
    d_lr = Learner(
        "D",
        "bt",
        lc.discriminator_ranks,
        dp,
        trained(d, dh, dp, dh.hidden),
        dh.discriminator_root_params,
        dh,
        compute_bytes(d, cuda),
        d.gradient_checkpointing,
        **common,
    )
    return [g, d_lr]


def packed(cfg: Config) -> bool:
    """Whether the learners pack their micro batches: ``learner.packing=true``; ``auto`` packs
    only under flash attention, and the models load with SDPA (transformers' default), so
    ``auto`` plans padded micro batches."""
    return cfg.learner.packing is True


def attention_of(cfg: Config, cuda: bool) -> Attention:
    """The attention the learners' forwards run: transformers' default SDPA; packed rows on
    GPU run flash attention's varlen kernel (no mask)."""
    return "flash" if packed(cfg) and cuda else "sdpa"


def micro_batch_tokens(cfg: Config) -> int:
    """T: the tokens a micro batch computes at most, padding included: the budget
    (``learner.max_tokens_per_micro_batch``; a longer sequence alone), else
    ``micro_batch_size`` rows padded to the longest sequence."""
    lc, d = cfg.learner, cfg.data
    longest = d.max_prompt_length + d.max_response_length
    if lc.max_tokens_per_micro_batch:
        return max(lc.max_tokens_per_micro_batch, longest)
    return lc.micro_batch_size * longest


def worst_micro_batch(cfg: Config, cuda: bool = True) -> MicroBatch:
    """The largest micro batch the config allows: T tokens, as rows of the longest sequence
    (the largest attention mask), the LM head on every position (a one-token prompt)."""
    tokens, d = micro_batch_tokens(cfg), cfg.data
    if packed(cfg):
        return MicroBatch(1, tokens, masked=attention_of(cfg, cuda) != "flash")
    longest = d.max_prompt_length + d.max_response_length
    return MicroBatch(tokens / longest, longest)


def shapes_of(batch: TokenBatch, plan: list[list[int]], packed: bool = False) -> list[MicroBatch]:
    """The micro batches of ``plan`` (rows of ``batch`` each) as the learner computes them:
    padded to the longest row, the LM head from the shortest prompt on (``policy_logprobs``),
    a mask when rows differ in length; packed: one row of their total length."""
    out = []
    for rows in plan:
        idx = rows or [0]  # an empty micro batch runs row 0 as a dummy
        lens = [int(batch.prompt_lens[i] + batch.response_lens[i]) for i in idx]
        if packed:
            out.append(MicroBatch(1, sum(lens)))
            continue
        first = max(1, min(int(batch.prompt_lens[i]) for i in idx))
        t = max(lens)
        out.append(MicroBatch(len(idx), t, len(idx) * (t - first + 1), min(lens) < t))
    return out


def resident(lr: Learner, cfg: Config, cuda: bool = True) -> dict[str, float]:
    """What a learner rank holds on its device between steps (module docstring)."""
    lc, k, n, p, c = cfg.learner, lr.key, lr.ranks, lr.params, lr.c
    ds, zero2 = lr.backend != "fsdp", lr.backend == "zero2"
    offload = {f: getattr(lc, f) and cuda for f in ("param_offload", "optimizer_offload")}
    if not lr.full:
        holds = not (lr.shared and k == "D")
        adapter = lr.trained
        return lora_resident(k, n, p, adapter, c, lr.reference, holds, zero2)
    per = f"{count(p)} / {n}"
    out = {}
    if not (offload["optimizer_offload"] or (offload["param_offload"] and not ds)):
        out[f"{k} fp32 master weights, 4 B x {per}"] = 4 * p / n
        out[f"{k} Adam m and v, 8 B x {per}"] = 8 * p / n
    if ds and not (offload["param_offload"] and not zero2):
        shard = "" if zero2 else f" / {n}"
        out[f"{k} ZeRO-{lc.zero_stage} weights, {c} B x {count(p)}{shard}"] = (
            c * p if zero2 else c * p / n
        )
    if lr.reference and not (lc.reference_offload and cuda):
        out[f"{k} KL reference, {c} B x {per}"] = c * p if zero2 else c * p / n
    return out


def update(lr: Learner, cfg: Config, cuda: bool = True) -> Moment:
    """A learner rank's largest moment in its own update, for the worst micro batch."""
    return step_peak(lr, [worst_micro_batch(cfg, cuda)], attention_of(cfg, cuda), cuda)


def learner_step(
    cfg: Config, key: str, micro_batches: list[MicroBatch], cuda: bool, kind: Kind | None = None
) -> Moment:
    """The peak of one training step of learner ``key`` ("G" or "D") on one of its ranks, for
    ``micro_batches``: its resident states plus the step's largest moment (``kind`` overrides
    G's update, ``sft`` or ``grpo``). What ``torch.cuda.max_memory_allocated`` measures on GPU
    (the CUDA context and the allocator's cache aside), the peak of live tensors on CPU."""
    lr = next(x for x in learners(cfg, cuda) if x.key == key)
    if kind is not None:
        grad = kind == "grpo" and bool(cfg.algorithm.grpo.entropy_coef)
        lr = dataclasses.replace(lr, kind=kind, entropy_grad=grad)
    peak = step_peak(lr, micro_batches, attention_of(cfg, cuda), cuda)
    return Moment(peak.name, resident(lr, cfg, cuda) | peak.terms)


def vllm_bytes(cfg: Config) -> tuple[float, float, float]:
    """Per GPU of an awake rollout worker: (its share, its weights, KV cache) in bytes."""
    r, sh, lora = cfg.rollout, shape_of(cfg.model.student.path), cfg.model.student.lora
    c, tp = compute_bytes(cfg.model.student), r.tensor_parallel_size
    weights = c * (sh.params + adapter_params(sh, lora)) / tp  # + one adapter slot
    if r.kv_cache_memory_bytes:
        return weights + r.kv_cache_memory_bytes + VLLM_RUNTIME, weights, r.kv_cache_memory_bytes
    share = r.gpu_memory_utilization * cfg.cluster.gpu_memory_gib * 2**30
    return share, weights, share - weights - VLLM_RUNTIME


def kv_bytes_per_token(cfg: Config) -> int:
    """K and V of every layer for one token, on one GPU of a worker (KV heads split over tp)."""
    sh, tp = shape_of(cfg.model.student.path), cfg.rollout.tensor_parallel_size
    c = compute_bytes(cfg.model.student)
    return 2 * sh.layers * math.ceil(sh.kv_heads / tp) * sh.dh * c
