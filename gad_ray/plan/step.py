"""The tensor memory of one learner step on one rank, moment by moment (docs/plan.md).

A training step of G (SFT, or GRPO with its KL reference) or of D (the BT step) holds, besides
the rank's resident states (:func:`gad_ray.plan.learners.resident`), different tensors at
different moments: the step's peak is its largest moment, not the sum of everything. Each
moment sums what the code allocates then (FSDP2, transformers' Qwen2 layer, the log-prob and
entropy chunks of :mod:`gad_ray.algorithms.policy`), for one micro batch of T computed tokens
(b rows x t, padded to the longest; packed: one row), c bytes of compute dtype, T' positions
the LM head runs on (``logits_to_keep``: from the micro batch's shortest prompt on), V the
vocabulary, h, i, q the hidden, MLP and query widths, N ranks:

- ``loss forward`` (G): the LM head's logits (c T'V), the copy flattening the shifted logits
  makes (c T'V, only with b > 1), the fp32 chunks the log-softmax keeps for the backward
  (4 T'V) and the 1024-row chunk being computed (4 B). GRPO's entropy metric (no graph) makes
  its own flattened copy and three fp32 chunks (12 B) at a time; with
  ``algorithm.grpo.entropy_coef`` != 0 its graph keeps 8 T'V more.
- ``loss backward`` (G): the kept chunks while the last chunk's gradients (the gather's, the
  log-sum-exp's and their sum, 12 B) are computed.
- ``reference forward`` (GRPO): the policy's kept chunks while the frozen reference computes
  its logits, their flattened copy and a chunk (8 B) without a graph.
- ``backward`` (at the last decoder layer, every checkpointed input still held): one layer
  recomputed, its gradients in flight (c T (2i + 2h)), its gathered weights and the next
  layer's (prefetched; on GPU also FSDP2's all-gather buffer), its unsharded gradients and the
  fp32 reduce-scatter buffer ((c + 4) x layer); G: the LM head's unsharded gradient.
- ``root reduce-scatter`` (end of the backward): the root unit's unsharded gradients, their
  fp32 copy and the reduced shard ((c + 4 + 4/N) x root).
- ``optimizer step``: AdamW's temporaries: on GPU the foreach implementation's sqrt of v
  (4 B per trained parameter of the shard), on CPU two of the largest tensor (8 B).

Every moment also holds the sharded fp32 gradients (4 B per trained parameter / N, from the
first micro batch's reduce-scatter on) and the root unit's gathered weights (FSDP2 keeps the
root gathered from the forward to the end of the backward; GRPO's reference keeps its own
after its no-grad forward); the forward and backward moments the activations: with gradient
checkpointing each layer's input (c h T, plus the rotary tables), without it every layer's
saved tensors; the final norm's; the attention mask.

One decoder layer saves per token (PyTorch saves only what the gradients of inputs needing
them use): each RMSNorm's fp32 input (4h), normalised input and output (2ch); the attention's
inputs (q, and k, v repeated to all heads whenever a mask is passed), output and its
contiguous copy (c x 5q with GQA under a mask), its log-sum-exp (4 B per head); gate, up,
SiLU(gate) and their product (4ci). Attention scores: eager attention keeps [b, heads, t, t]
(the fp32 softmax and its c copy); SDPA converts the boolean [b, 1, t, t] mask to the compute
dtype in every layer (twice on GPU, where the memory-efficient kernel pads it to a multiple of
16); flash attention (packed rows on GPU) takes none.

DeepSpeed (not measured): ZeRO-3 keeps up to ``stage3_max_live_parameters`` (1e9) gathered
instead of FSDP2's units, ZeRO-2 none (its weights are whole); both reduce through a bucket
of ``reduce_bucket_size`` (5e8) elements, counted in fp32. LoRA (``full=False``): the frozen
base's root and layers are gathered the same way, gradients and optimizer temporaries are the
adapters'; activations are counted as for full fine-tuning (an upper bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from gad_ray.models.shapes import ModelShape
from gad_ray.plan.units import count

Kind = Literal["sft", "grpo", "bt"]
Attention = Literal["sdpa", "eager", "flash"]
Backend = Literal["fsdp", "zero2", "zero3"]
CHUNK = 1024  # rows of the log-prob and entropy chunks (gad_ray/algorithms/policy.py)
DS_LIVE, DS_BUCKET = 10**9, 5 * 10**8  # DeepSpeed's max live parameters, reduce bucket


@dataclass(frozen=True)
class MicroBatch:
    """A micro batch as the forward computes it: ``rows`` of ``length`` tokens (padded to the
    longest; packed: one row of the packed length), the LM head on ``logits`` positions
    (default all), the attention given a materialised mask (padding; packed rows where the
    attention builds a block-causal one)."""

    rows: float
    length: int
    logits: float | None = None
    masked: bool = True

    @property
    def tokens(self) -> float:
        return self.rows * self.length

    @property
    def kept(self) -> float:
        return self.tokens if self.logits is None else self.logits


@dataclass(frozen=True)
class Learner:
    """What the memory model needs of one learner role."""

    key: str  # "G" | "D"
    kind: Kind  # its update: G's SFT or GRPO, D's BT
    ranks: int
    params: int  # all its parameters (LoRA: the base's too)
    trained: int  # with gradients and AdamW state (LoRA: the adapters, + D's head)
    root: int  # the root unit: embeddings, LM head unless tied, final norm (D: its head)
    shape: ModelShape
    c: int  # bytes of the compute dtype
    checkpointing: bool
    backend: Backend = "fsdp"
    reference: bool = False  # G holds a frozen KL reference
    entropy_grad: bool = False  # GRPO: the entropy is in the loss
    shared: bool = False  # learner.shared_base: G and D are one group on one base (G holds it)

    @property
    def phase(self) -> str:
        return f"{self.key} update"

    @property
    def full(self) -> bool:
        """Every weight trained (not LoRA)."""
        return self.trained == self.params

    @property
    def largest(self) -> int:
        """Elements of the largest trained tensor (the embedding, or one adapter matrix)."""
        return self.shape.embed_params if self.full else self.trained // self.shape.layers


@dataclass
class Moment:
    """A named moment of a step and its terms (label -> bytes)."""

    name: str
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def layer_saved(lr: Learner, mb: MicroBatch, attention: Attention, cuda: bool) -> float:
    """Bytes one decoder layer keeps for its backward (module docstring)."""
    sh, c, t = lr.shape, lr.c, mb.tokens
    q, kv, h = sh.heads * sh.dh, sh.kv_dim, sh.hidden
    repeated = attention == "eager" or (attention == "sdpa" and mb.masked)
    attn_in = 3 * q if repeated and kv < q else q + 2 * kv
    out = (2 * (4 + 2 * c) * h + c * (attn_in + 2 * q) + 4 * c * sh.intermediate) * t
    if attention == "eager":
        return out + (4 + c) * mb.rows * sh.heads * mb.length**2
    out += 4 * sh.heads * t  # log-sum-exp
    if attention == "sdpa" and mb.masked:
        out += (2 if cuda else 1) * c * mb.rows * mb.length**2
    return out


def _gradients(lr: Learner) -> dict[str, float]:
    """The sharded fp32 gradients, held from the first micro batch's reduce-scatter on."""
    n = lr.ranks
    return {f"{lr.key} fp32 gradients, 4 B x {count(lr.trained)} / {n}": 4 * lr.trained / n}


def _root(lr: Learner) -> dict[str, float]:
    """The root unit's gathered weights, from the forward to the end of the backward."""
    if lr.backend == "zero2":
        return {}
    return {f"{lr.key} gathered root unit, {lr.c} B x {count(lr.root)}": lr.c * lr.root}


def _reference_root(lr: Learner) -> dict[str, float]:
    """GRPO, full fine-tuning: the reference's root, gathered since its first forward."""
    if lr.kind != "grpo" or not lr.full or lr.backend == "zero2":
        return {}
    return {f"G reference's gathered root unit, {lr.c} B x {count(lr.root)}": lr.c * lr.root}


def _activations(lr: Learner, mb: MicroBatch, attention: Attention, cuda: bool) -> dict:
    """The activations a micro batch's backward needs, held from its forward on."""
    k, c, sh, t = lr.key, lr.c, lr.shape, mb.tokens
    rotary = 2 * c * sh.dh * t
    if lr.checkpointing:
        label = f"{k} checkpointed layer inputs, {sh.layers} x {c} B x h x {t:.0f} tokens"
        out = {label: sh.layers * c * sh.hidden * t + rotary}
    else:
        label = f"{k} activations of {sh.layers} layers, {t:.0f} tokens, no checkpointing"
        out = {label: sh.layers * layer_saved(lr, mb, attention, cuda) + rotary}
    # the fp32 input, the normalised input (D: not the output, only its last rows are used)
    out[f"{k} final norm, {t:.0f} tokens"] = (4 + (2 if k == "G" else 1) * c) * sh.hidden * t
    if mb.masked and attention != "flash":
        size = 1 if attention == "sdpa" else c  # bool; eager: additive, compute dtype
        out[f"{k} attention mask, {size} B x {mb.rows:.3g} x {mb.length}^2"] = (
            size * mb.rows * mb.length**2
        )
    return out


def _logit_moments(lr: Learner, mb: MicroBatch) -> list[Moment]:
    """G's loss forward, loss backward and (GRPO) reference forward: their logits' terms."""
    c, v, tl = lr.c, lr.shape.vocab, mb.kept
    last = (tl - CHUNK * (math.ceil(tl / CHUNK) - 1)) * v  # the last chunk, the largest moment
    shape = f"{tl:.0f} x {v}"
    head = {f"G logits, {c} B x {shape}": c * tl * v}
    if mb.rows > 1:
        head[f"G flattened shifted logits, {c} B x {shape}"] = c * tl * v
    kept = {f"G fp32 log-softmax chunks kept for the backward, 4 B x {shape}": 4 * tl * v}
    if lr.entropy_grad:
        kept[f"G entropy graph: fp32 chunks and softmax, 8 B x {shape}"] = 8 * tl * v
    forward = head | kept | {"G fp32 chunk in flight, 4 B x 1024 rows": 4 * last}
    if lr.kind == "grpo":
        entropy = head | kept | {"G fp32 entropy chunks in flight, 12 B x 1024 rows": 12 * last}
        forward = max(forward, entropy, key=lambda d: sum(d.values()))
    out = [
        Moment("loss forward", forward),
        Moment(
            "loss backward", kept | {"G fp32 gradients of a chunk, 12 B x 1024 rows": 12 * last}
        ),
    ]
    if lr.kind == "grpo":
        ref = {f"G reference logits (+ flattened copy), {c} B x {shape}": sum(head.values())}
        ref[f"G reference final norm output, {c} B x h x {mb.tokens:.0f}"] = (
            c * lr.shape.hidden * mb.tokens
        )
        ref["G fp32 chunk in flight, no graph, 8 B x 1024 rows"] = 8 * last
        out.append(Moment("reference forward", kept | ref))
    return out


def _layer_weights(lr: Learner, cuda: bool) -> dict[str, float]:
    """Gathered decoder-layer weights and unsharded gradients in the backward."""
    k, c, sh = lr.key, lr.c, lr.shape
    unit = sh.layer_params
    if lr.backend == "zero3":
        live = min(DS_LIVE, lr.params)
        out = {f"{k} ZeRO-3 gathered weights (max live), {c} B x {count(live)}": c * live}
    elif lr.backend == "fsdp":
        n = 3 if cuda else 2  # the layer, the prefetched one (GPU: the all-gather buffer kept)
        out = {f"{k} layer weights gathered, {c} B x {n} layers": n * c * unit}
    else:
        out = {}
    grads = unit if lr.full else lr.trained / sh.layers
    if lr.backend == "fsdp":
        out[f"{k} layer gradients: unsharded + fp32 reduce-scatter, {c + 4} B x layer"] = (
            c + 4
        ) * grads
    else:
        out[f"{k} DeepSpeed reduce bucket, 4 B x {count(DS_BUCKET)}"] = 4 * min(
            DS_BUCKET, lr.trained
        )
    return out


def moments(lr: Learner, mb: MicroBatch, attention: Attention, cuda: bool) -> list[Moment]:
    """The step's moments for micro batch ``mb`` (module docstring), resident states excluded."""
    k, c, sh, n = lr.key, lr.c, lr.shape, lr.ranks
    grads, ref = _gradients(lr), _reference_root(lr)
    acts = grads | _root(lr) | ref | _activations(lr, mb, attention, cuda)
    out = []
    if k == "G":
        out += [Moment(m.name, acts | m.terms) for m in _logit_moments(lr, mb)]
    back = dict(acts)
    if k == "G" and lr.full:
        head = sh.embed_params + sh.hidden
        back[f"G LM head gradient, unsharded, {c} B x {count(head)}"] = c * head
    back[f"{k} one layer recomputed, {mb.tokens:.0f} tokens"] = layer_saved(lr, mb, attention, cuda)
    back[f"{k} its gradients in flight, {c} B x (2i + 2h) x {mb.tokens:.0f}"] = (
        c * mb.tokens * (2 * sh.intermediate + 2 * sh.hidden)
    )
    out.append(Moment("backward", back | _layer_weights(lr, cuda)))
    if lr.full and lr.backend == "fsdp":
        label = f"{k} root gradients: unsharded, fp32, shard, ({c} + 4 + 4/{n}) B x root"
        root = {label: (c + 4 + 4 / n) * lr.root}
        out.append(Moment("root reduce-scatter", grads | ref | root))
    if cuda:
        opt = {
            f"{k} AdamW foreach temporaries, 4 B x {count(lr.trained)} / {n}": 4 * lr.trained / n
        }
    else:
        opt = {f"{k} AdamW temporaries, 8 B x the largest tensor / {n}": 8 * lr.largest / n}
    out.append(Moment("optimizer step", grads | ref | opt))
    return out


def step_peak(
    lr: Learner, micro_batches: list[MicroBatch], attention: Attention, cuda: bool
) -> Moment:
    """The largest moment of the step over its micro batches (resident states excluded)."""
    every = (m for mb in micro_batches for m in moments(lr, mb, attention, cuda))
    return max(every, key=lambda m: m.total)
