"""A learner's micro-batches, padded or packed, and the forwards that read them.

A micro-batch holds the rows the plan gives a rank (a :class:`TokenBatch`, right-padded to its
longest row). Packed (``learner.packing``, :func:`use_packing`), the model sees ONE row
instead: the rows' real tokens concatenated, position ids restarting at 0 at each row and no
attention mask. transformers then keeps attention within each row: its mask code reads the
packed layout from the position ids (``masking_utils.find_packed_sequence_indices``) and builds
a block-causal mask for ``sdpa``/``eager``/``flex_attention``, while flash-attention's varlen
kernel gets ``cu_seqlens`` from them (``modeling_flash_attention_utils``). It does so only
without a KV cache: every forward here passes ``use_cache=False`` (with a cache the packed row
would be one causal sequence, tested). No padding token is computed; per-token results are scattered back to the padded ``[b, t]`` layout, so losses,
advantages and old log-probs line up with the host's :class:`TokenBatch` as before.

The LM head runs only where it is read: packed, at the positions that predict a response token;
padded, from the micro-batch's shortest prompt on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from gad_ray.algorithms import (
    entropy_from_logits,
    proxy_kd_loss_from_terms,
    proxy_kd_loss_topk,
    proxy_topk,
    token_logprobs,
    topk_kl_from_targets,
)
from gad_ray.data.batch import TokenBatch
from gad_ray.models.score_head import last_response_index

# attention kernels that compute only each packed row's own block (flash-attention varlen)
VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
# those that read the packed layout through a block-causal mask over the whole packed row
MASKED = ("sdpa", "eager", "flex_attention")


@dataclass
class Packed:
    """The packed layout of a micro-batch of ``b`` rows holding ``N`` real tokens."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], 0 at each row's first token
    rows: torch.Tensor  # [N] the row of each packed token
    cols: torch.Tensor  # [N] its column in the padded layout
    starts: torch.Tensor  # [b] the packed position of each row's first token


@dataclass
class MicroBatch(TokenBatch):
    """A micro-batch on the learner's device: its padded rows and, packed, their packed layout."""

    packed: Packed | None = None

    def computed_tokens(self) -> int:
        """Tokens the forward computes: the real ones packed, rows x longest row padded."""
        return self.packed.input_ids.numel() if self.packed is not None else self.input_ids.numel()


def pack(mb: TokenBatch) -> Packed:
    """The packed layout of right-padded rows (each row's real tokens are a prefix)."""
    real = mb.attention_mask.bool()
    rows, cols = real.nonzero(as_tuple=True)  # row-major: row 0's tokens, then row 1's, ...
    lens = real.sum(dim=1)
    return Packed(
        input_ids=mb.input_ids[rows, cols][None],
        position_ids=cols[None],
        rows=rows,
        cols=cols,
        starts=torch.cumsum(lens, 0) - lens,
    )


def micro_batch(
    batch: TokenBatch, rows: list[int], device: torch.device, packed: bool
) -> MicroBatch:
    """Rows ``rows`` of ``batch`` on ``device`` (trailing padding columns trimmed), packed or not."""
    mb = batch.select(rows).to(device)
    rows_on_device = {f.name: getattr(mb, f.name) for f in fields(TokenBatch)}
    return MicroBatch(**rows_on_device, packed=pack(mb) if packed else None)


def attn_implementation(module: nn.Module) -> str:
    """The attention implementation of the first transformers model inside ``module``."""
    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            return str(m.config._attn_implementation)
    raise ValueError(f"{type(module).__name__} holds no transformers model")


def use_packing(setting: Literal["auto"] | bool, attn: str) -> bool:
    """Whether micro-batches are packed, for ``learner.packing`` and attention ``attn``.

    ``auto`` packs with flash-attention's varlen kernels only: they compute each row's own
    causal block, so packing removes the padding and costs nothing. Under ``sdpa``/``eager``
    (CPU, and GPU without flash-attention) the block-causal mask is materialised ([N, N]) and
    the kernels compute every query-key pair of the packed row, masked or not: attention costs
    N^2 instead of the sum of the rows' squares, more than the few padding tokens of
    length-grouped micro-batches save; ``auto`` keeps them padded. ``true`` packs under any
    implementation that reads the packed layout (``VARLEN`` and ``MASKED``), ``false`` never.
    """
    if setting == "auto":
        return attn in VARLEN
    if setting and attn not in VARLEN + MASKED:
        raise ValueError(
            f"learner.packing=true: the model's attention implementation {attn!r} cannot read "
            f"packed sequences (supported: {', '.join(VARLEN + MASKED)}); set "
            "learner.packing=auto or false"
        )
    return bool(setting)


def model_inputs(mb: MicroBatch | TokenBatch) -> dict[str, torch.Tensor | None]:
    """The forward's token inputs: the packed row and its position ids (no attention mask), or
    the padded rows and their attention mask."""
    p = getattr(mb, "packed", None)
    if p is None:
        return {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask}
    return {"input_ids": p.input_ids, "position_ids": p.position_ids, "attention_mask": None}


def _targets(mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed positions predicting a response token (its position - 1; column 0 has no
    prediction), and the row and column of that token."""
    p = mb.packed
    keep = (mb.response_mask[p.rows, p.cols] > 0) & (p.cols > 0)
    at = keep.nonzero().flatten()
    return at - 1, p.rows[at], p.cols[at]


def response_logits(model: Any, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Packed micro-batch: the logits [1, M, V] predicting its M response tokens (column >= 1),
    the tokens [1, M] and their (rows, cols) in the padded layout."""
    pos, rows, cols = _targets(mb)
    logits = model(**model_inputs(mb), use_cache=False, logits_to_keep=pos).logits
    return logits, mb.input_ids[rows, cols][None], (rows, cols)


def unpack(values: torch.Tensor, index: tuple, shape: tuple[int, ...]) -> torch.Tensor:
    """``values`` [1, M, ...] at ``index`` (rows, cols) of a zero tensor of ``shape``
    (differentiable)."""
    out = values.new_zeros(shape)
    return out.index_put(index, values[0])


def policy_logprobs(
    model: Any,
    mb: MicroBatch | TokenBatch,
    temperature: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Aligned log-probs [b, t] of ``mb``'s tokens under ``softmax(logits / temperature)``
    (position t: token t given < t) and, with ``entropy``, the entropy [b, t] of that
    distribution: detached unless ``entropy_grad`` (no [tokens, vocab] graph is kept for a
    metric). Only positions whose value is read are computed (0 elsewhere): packed, the
    response tokens; padded, from the micro-batch's shortest prompt on (the LM head never runs
    on the prompt tokens every row shares, which saves their [tokens, vocab] logits, often the
    largest tensor of a step)."""
    if getattr(mb, "packed", None) is not None:
        logits, labels, index = response_logits(model, mb)
        place = lambda x: unpack(x, index, tuple(mb.input_ids.shape))  # noqa: E731
    else:
        first = max(1, int(mb.prompt_lens.min()))  # no row has a response token before this
        keep = mb.input_ids.shape[1] - first + 1  # logits at positions first - 1 .. t - 1
        logits = model(**model_inputs(mb), use_cache=False, logits_to_keep=keep).logits[:, :-1]
        labels = mb.input_ids[:, first:]
        place = lambda x: F.pad(x, (first, 0))  # noqa: E731
    logp = place(token_logprobs(logits, labels, temperature))
    if not entropy:
        return logp, None
    if entropy_grad:
        return logp, place(entropy_from_logits(logits, temperature))
    with torch.no_grad():
        return logp, place(entropy_from_logits(logits.detach(), temperature))


def discriminator_scores(scorer: Any, mb: MicroBatch | TokenBatch) -> torch.Tensor:
    """D's scores [b] (``scorer``: a :class:`~gad_ray.discriminator.model.DiscriminatorModel`
    call) at each row's last response token."""
    p = getattr(mb, "packed", None)
    if p is None:
        return scorer(**model_inputs(mb), response_mask=mb.response_mask)
    last = p.starts + last_response_index(mb.response_mask)
    return scorer(**model_inputs(mb), last_index=last)


def topk_targets(
    model: Any, mb: MicroBatch | TokenBatch, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The proxy's top-k log-probs and ids [b, t, k] of the distribution each token is drawn
    from, and its token log-probs [b, t] (0 at t=0; packed, 0 off the response too)."""
    b, t = mb.input_ids.shape
    if getattr(mb, "packed", None) is not None:
        logits, labels, index = response_logits(model, mb)
        top_logp, top_ids = proxy_topk(logits, k)
        logp = token_logprobs(logits, labels).float()
        return (
            unpack(top_logp, index, (b, t, k)),
            unpack(top_ids, index, (b, t, k)),
            unpack(logp, index, (b, t)),
        )
    logits = model(**model_inputs(mb), use_cache=False).logits[:, :-1]
    top_logp, top_ids = proxy_topk(logits, k)
    logp = token_logprobs(logits, mb.input_ids[:, 1:]).float()
    return F.pad(top_logp, (0, 0, 1, 0)), F.pad(top_ids, (0, 0, 1, 0)), F.pad(logp, (1, 0))


def distill_loss(
    model: Any,
    mb: MicroBatch | TokenBatch,
    top_logp: torch.Tensor,
    top_ids: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    token_den: float,
    seq_den: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Proxy-KD student loss of ``mb`` (``proxy_kd_loss_topk``) against the proxy's targets
    ``top_logp``/``top_ids`` [b, t, k] (aligned with the tokens) and sample ``weights`` [b]."""
    b, t = mb.input_ids.shape
    mask = mb.response_mask[:, 1:]
    if getattr(mb, "packed", None) is None:
        logits = model(**model_inputs(mb), use_cache=False).logits[:, :-1]
        args = (top_logp[:, 1:], top_ids[:, 1:], mb.input_ids[:, 1:], mask, weights)
        return proxy_kd_loss_topk(logits, *args, alpha, token_den, seq_den)
    logits, labels, (rows, cols) = response_logits(model, mb)
    targets = top_logp[rows, cols][None], top_ids[rows, cols][None]
    kl = topk_kl_from_targets(*targets, logits, torch.ones_like(labels))
    logp = token_logprobs(logits, labels)
    index = (rows, cols - 1)  # position t - 1 predicts token t
    terms = unpack(logp, index, (b, t - 1)), unpack(kl, index, (b, t - 1))
    return proxy_kd_loss_from_terms(*terms, mask, weights, alpha, token_den, seq_den)
