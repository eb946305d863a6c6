"""Policy-gradient pieces: loss aggregation, PPO-clip, KL penalties, entropy, token log-probs.

Conventions: token-level tensors are [B, T] aligned with the response tokens, ``mask`` [B, T]
(float or bool) is 1 on real response tokens and 0 on padding; sequence-level tensors are [B].

Global-batch normalisation: a loss over a global batch that is split across ranks and
micro-batches is computed as

    den  = loss_denominator(mask_of_the_whole_global_batch, mode, norm_len)   # once
    loss = sum over micro-batches mb of aggregate_loss(loss_mat_mb, mask_mb, mode, den)

Every ``aggregate_loss`` is a plain sum over its own sequences divided by the shared ``den``,
so the micro-batch values (and their gradients) add up exactly to the full-batch loss, however
the sequences are split. ``loss_denominator`` is itself additive over a split along the batch
dimension (given a fixed ``norm_len``), so ranks may also sum their local denominators with an
all-reduce instead of seeing the whole mask.
"""

from typing import Literal

import torch
import torch.nn.functional as F

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KLKind = Literal["k1", "k2", "k3", "low_var_kl"]


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")


def _check_token_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but mask has shape {tuple(mask.shape)}"
            )


def loss_denominator(mask: torch.Tensor, mode: AggMode, norm_len: int | None = None) -> float:
    """The global normaliser of ``aggregate_loss``, computed once on the whole global batch.

    - ``token-mean``: number of response tokens, ``count_nonzero(mask)``.
    - ``seq-mean-token-mean``: number of sequences, ``B``.
    - ``seq-mean-token-sum-norm``: ``B * norm_len``, a fixed horizon (Dr. GRPO); ``norm_len``
      defaults to ``T`` of this mask, pass the configured max response length to make it
      independent of padding.

    The value is additive over any split of the batch along B (with a fixed ``norm_len``), so
    ranks may all-reduce (sum) their local denominators instead.
    """
    _check_mode(mode)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if mode == "token-mean":
        den = float(mask.bool().sum())
    elif mode == "seq-mean-token-mean":
        den = float(mask.shape[0])
    else:
        horizon = mask.shape[1] if norm_len is None else norm_len
        if horizon <= 0:
            raise ValueError(f"norm_len must be positive, got {horizon}")
        den = float(mask.shape[0] * horizon)
    return den


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode,
    global_denominator: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar, normalised by a global denominator.

    With m = (mask != 0), n_b = sum_t m[b, t] (clamped to >= 1) and D = ``global_denominator``:
    - ``token-mean``:              sum_{b,t} l*m / D             (D = total tokens)
    - ``seq-mean-token-mean``:     sum_b (sum_t l*m / n_b) / D   (D = total sequences)
    - ``seq-mean-token-sum-norm``: sum_{b,t} l*m / D             (D = sequences * norm_len)
    D defaults to ``loss_denominator(mask, mode)`` (this batch is the whole batch) and is
    clamped to >= 1, so an all-padding batch gives 0, not NaN. Padding positions are excluded
    with ``where``, so NaN/inf there cannot leak into the loss.
    """
    _check_mode(mode)
    _check_token_shapes(mask, loss_mat=loss_mat)
    if global_denominator is None:
        global_denominator = loss_denominator(mask, mode)
    if global_denominator < 0:
        raise ValueError(f"global_denominator must be >= 0, got {global_denominator}")
    global_denominator = max(global_denominator, 1.0)
    keep = mask.bool()
    masked = torch.where(keep, loss_mat, torch.zeros_like(loss_mat))
    if mode == "seq-mean-token-mean":
        n_tokens = keep.sum(-1).clamp(min=1).to(loss_mat.dtype)
        return (masked.sum(-1) / n_tokens).sum() / global_denominator
    return masked.sum() / global_denominator


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate loss.

    ratio = exp(logp - old_logp) (log-ratio clamped to [-20, 20] against overflow),
        l = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    and with dual clip c > 1, for A < 0:  l = min(l, -c * A).

    Args:
        logp, old_logp, adv, mask: [B, T]; ``old_logp`` and ``adv`` are treated as constants.
        dual_clip: c of dual-clip PPO, or None to disable.

    Returns:
        ``loss_mat`` [B, T] (0 on padding), to reduce with ``aggregate_loss``, and a dict of
        detached [B, T] float tensors (0 on padding) to reduce with the same mask:
        ``clipped`` (the clipped branch is the active one: pg_clipfrac), ``dual_clipped``
        (the dual-clip bound is active), ``approx_kl`` (k1 estimate ``old_logp - logp``) and
        ``ratio``.
    """
    _check_token_shapes(mask, logp=logp, old_logp=old_logp, adv=adv)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
    keep = mask.bool()
    adv = adv.detach()
    log_ratio = (logp - old_logp.detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual = torch.zeros_like(is_clipped)
    if dual_clip is not None:
        bound = -dual_clip * adv
        is_dual = (adv < 0) & (loss > bound)
        loss = torch.where(is_dual, bound, loss)
    zero = torch.zeros_like(loss)
    stats = {
        "clipped": (is_clipped & keep).to(logp.dtype),
        "dual_clipped": (is_dual & keep).to(logp.dtype),
        "approx_kl": torch.where(keep, -log_ratio, zero).detach(),
        "ratio": torch.where(keep, ratio, zero).detach(),
    }
    return torch.where(keep, loss, zero), stats


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "low_var_kl"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens, [B, T].

    - ``k1``: ``logp - ref``
    - ``k2``: ``0.5 * (logp - ref)^2``
    - ``k3`` / ``low_var_kl``: ``exp(ref - logp) - (ref - logp) - 1``, clamped to [-10, 10]
    ``ref_logp`` is treated as a constant; reduce the result with ``aggregate_loss``.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape"
        )
    diff = logp - ref_logp.detach()
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    if kind in ("k3", "low_var_kl"):
        return (torch.exp(-diff) + diff - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; expected one of k1, k2, k3, low_var_kl")


def _row_chunks(logits: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, ...]:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return logits.reshape(-1, logits.shape[-1]).split(chunk_size)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``, [B, T].

    ``logits[b, t]`` must be the prediction for ``labels[b, t]`` (the caller shifts), and every
    label must be a valid id, padding included (use the pad id, not -100). Computed as
    ``logit[label] / temperature - logsumexp(logits / temperature)`` over ``chunk_size`` rows at
    a time in float32 (float64 stays float64), so no full [B, T, V] log-softmax (or float32
    copy) is materialised when no gradient is needed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} [B, T, V]"
        )
    vocab = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(
            f"labels must lie in [0, {vocab}), got min {int(labels.min())} and max "
            f"{int(labels.max())} (replace -100 padding with a valid id and mask it)"
        )
    out = []
    label_chunks = labels.reshape(-1).split(chunk_size)
    for chunk, lab in zip(_row_chunks(logits, chunk_size), label_chunks, strict=True):
        x = chunk.to(torch.promote_types(chunk.dtype, torch.float32)) / temperature
        out.append(x.gather(-1, lab[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1))
    return torch.cat(out).reshape(labels.shape)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position, [B, T].

    ``H = logsumexp(x) - sum_v softmax(x)_v * x_v`` with ``x = logits / temperature``, computed
    in float32 (float64 stays float64) over ``chunk_size`` rows at a time.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    out = []
    for chunk in _row_chunks(logits, chunk_size):
        x = chunk.to(torch.promote_types(chunk.dtype, torch.float32)) / temperature
        out.append(torch.logsumexp(x, dim=-1) - (F.softmax(x, dim=-1) * x).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])
