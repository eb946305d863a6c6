"""Supervised and adversarial losses: SFT, Bradley-Terry (discriminator), DPO and Proxy-KD.

Same conventions as ``policy``: token-level [B, T] with a response ``mask``, sequence-level [B].
"""

from typing import Literal

import torch
import torch.nn.functional as F

from .policy import aggregate_loss, token_logprobs

Reduction = Literal["mean", "sum"]


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


def _check_same_1d(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(tensors.values()))
    if first.dim() != 1 or first.numel() == 0 or len(set(shapes.values())) != 1:
        raise ValueError(f"expected non-empty 1-D tensors of equal length, got shapes {shapes}")


def sft_loss_mat(logp: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``-logp`` [B, T]; ``aggregate_loss(..., "token-mean")`` gives the
    token-mean SFT loss of docs/algorithms.md §2.5."""
    return -logp


def seq_mean_logp(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token log-prob ``sum_t logp*m / max(sum_t m, 1)`` -> [B]."""
    if mask.dim() != 2 or logp.shape != mask.shape:
        raise ValueError(
            f"expected logp and mask [B, T], got {tuple(logp.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    total = torch.where(keep, logp, torch.zeros_like(logp)).sum(-1)
    return total / keep.sum(-1).clamp(min=1).to(logp.dtype)


def bt_loss(
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry discriminator loss over P (teacher, student) pairs, one per student sample.

    ``L = reduce_p -logsigmoid(t_p - s_p)``; ``reduction="sum"`` returns the per-pair sum so a
    micro-batched caller can divide by the global pair count.

    Returns:
        (loss, metrics) with metrics over these P pairs: ``d_loss`` (mean loss), ``d_acc``
        (fraction with t > s; ties count as wrong), ``teacher_score_mean``,
        ``student_score_mean``.
    """
    _check_same_1d(teacher_scores=teacher_scores, student_scores=student_scores)
    per_pair = -F.logsigmoid(teacher_scores - student_scores)
    with torch.no_grad():
        metrics = {
            "d_loss": per_pair.mean().item(),
            "d_acc": (teacher_scores > student_scores).float().mean().item(),
            "teacher_score_mean": teacher_scores.float().mean().item(),
            "student_score_mean": student_scores.float().mean().item(),
        }
    return _reduce(per_pair, reduction), metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    sft_weight: float = 1.0,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO with an SFT term on the chosen response (Proxy-KD alignment, docs/algorithms.md §4.3).

    All inputs are per-sequence MEAN token log-probs [B] (see ``seq_mean_logp``); the reference
    ones are constants. Per pair, with rewards ``c = beta*(pc - rc)`` and ``r = beta*(pr - rr)``:
        l = -logsigmoid(c - r) - sft_weight * pc

    Returns:
        (loss, metrics): ``dpo_loss`` and ``sft_loss`` (means of the two terms, ``sft_loss`` =
        mean of -pc), ``chosen_reward``, ``rejected_reward``, ``reward_margin`` (means) and
        ``reward_accuracy`` (fraction with c > r).
    """
    _check_same_1d(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    chosen_reward = beta * (policy_chosen - ref_chosen.detach())
    rejected_reward = beta * (policy_rejected - ref_rejected.detach())
    pref = -F.logsigmoid(chosen_reward - rejected_reward)
    per_pair = pref - sft_weight * policy_chosen
    with torch.no_grad():
        metrics = {
            "dpo_loss": pref.mean().item(),
            "sft_loss": (-policy_chosen).mean().item(),
            "chosen_reward": chosen_reward.mean().item(),
            "rejected_reward": rejected_reward.mean().item(),
            "reward_margin": (chosen_reward - rejected_reward).mean().item(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
        }
    return _reduce(per_pair, reduction), metrics


def proxy_sample_weights(
    seq_mean_logp: torch.Tensor, temp: float = 0.4, eps: float = 1e-6
) -> torch.Tensor:
    """Proxy-confidence sample weights ``w = sigmoid((s - mean(s)) / (temp * std(s)))`` [B].

    ``s`` is the proxy's per-sequence mean token log-prob of the teacher response over the whole
    batch/chunk; std is the unbiased one (as for GRPO advantages). When std < ``eps`` (all
    equal, or a single sample) every weight is 0.5. The weights are detached constants.
    """
    if seq_mean_logp.dim() != 1 or seq_mean_logp.numel() == 0:
        raise ValueError(f"seq_mean_logp must be non-empty [B], got {tuple(seq_mean_logp.shape)}")
    if temp <= 0:
        raise ValueError(f"temp must be positive, got {temp}")
    s = seq_mean_logp.detach()
    std = s.std() if s.numel() > 1 else torch.zeros((), dtype=s.dtype, device=s.device)
    if not bool(torch.isfinite(std)) or float(std) < eps:
        return torch.full_like(s, 0.5)
    return torch.sigmoid((s - s.mean()) / (temp * std))


def proxy_topk(proxy_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The proxy's top-k targets of each position: ``(log_p, ids)`` [..., k], where ``log_p`` is
    the log-softmax over the k largest logits only (renormalised over those k ids), float32
    (float64 stays float64), and ``ids`` their token ids. A constant (no gradient)."""
    vocab = proxy_logits.shape[-1]
    if not 0 < k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    top, ids = proxy_logits.detach().topk(k, dim=-1)  # upcasting is exact: same order
    return F.log_softmax(top.to(torch.promote_types(top.dtype, torch.float32)), dim=-1), ids


def _topk_kl_rows(log_p: torch.Tensor, ids: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    x = student.to(torch.promote_types(student.dtype, torch.float32))
    log_q = x.gather(-1, ids) - torch.logsumexp(x, dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def topk_kl_from_targets(
    top_logp: torch.Tensor,
    top_ids: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``topk_kl`` from precomputed proxy targets ``proxy_topk(proxy_logits, k)`` [B, T, k]
    (what a proxy learner ships to the student's ranks instead of [B, T, V] logits)."""
    if top_logp.shape != top_ids.shape or top_logp.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"top_logp {tuple(top_logp.shape)} and top_ids {tuple(top_ids.shape)} must be "
            f"[B, T, k] with [B, T] of student_logits {tuple(student_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match logits [B, T] "
            f"{tuple(student_logits.shape[:2])}"
        )
    k, vocab = top_logp.shape[-1], student_logits.shape[-1]
    rows = [
        _topk_kl_rows(lp, ids, x)
        for lp, ids, x in zip(
            top_logp.detach().reshape(-1, k).split(chunk_size),
            top_ids.reshape(-1, k).split(chunk_size),
            student_logits.reshape(-1, vocab).split(chunk_size),
            strict=True,
        )
    ]
    kl = torch.cat(rows).reshape(mask.shape)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def topk_kl(
    proxy_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    k: int = 10,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-token ``KL(p_proxy_topk || p_student)`` [B, T] (0 on padding).

    ``p_proxy_topk`` is the softmax over the proxy's top-k logits only (renormalised over those
    k ids). The student's log-probs are read at the same k ids from its FULL softmax and are not
    renormalised, so ``sum_i p_i (log p_i - log q_i)`` with ``sum_i q_i <= 1``; this is >= 0
    and also pushes the student's mass onto the k ids. The proxy is a constant. Computed in
    float32 (float64 stays float64) over ``chunk_size`` rows at a time.
    """
    if proxy_logits.dim() != 3 or proxy_logits.shape != student_logits.shape:
        raise ValueError(
            f"proxy_logits {tuple(proxy_logits.shape)} and student_logits "
            f"{tuple(student_logits.shape)} must both be [B, T, V] of the same shape (shared "
            f"tokenizer)"
        )
    if mask.shape != proxy_logits.shape[:2]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match logits [B, T] {tuple(proxy_logits.shape[:2])}"
        )
    vocab = proxy_logits.shape[-1]
    if not 0 < k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    rows = []
    proxy = proxy_logits.reshape(-1, vocab).split(chunk_size)
    student = student_logits.reshape(-1, vocab).split(chunk_size)
    for p_chunk, s_chunk in zip(proxy, student, strict=True):
        rows.append(_topk_kl_rows(*proxy_topk(p_chunk, k), s_chunk))
    kl = torch.cat(rows).reshape(mask.shape)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def _check_weights(weights: torch.Tensor, mask: torch.Tensor) -> None:
    if weights.shape != mask.shape[:1]:
        raise ValueError(f"weights {tuple(weights.shape)} must be [B] for mask {tuple(mask.shape)}")


def proxy_kd_loss(
    student_logits: torch.Tensor,
    proxy_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 1.0,
    k: int = 10,
    token_denominator: float | None = None,
    seq_denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Proxy-KD student loss on teacher-forced responses (docs/algorithms.md §4.5):

        L = CE(student, y) + alpha * mean_b [ w_b * mean_t KL_topk(b, t) ]

    CE is the token-mean of ``-log q(y_t)`` (``aggregate_loss`` mode ``token-mean``, denominator
    ``token_denominator``); the KD term is ``seq-mean-token-mean`` of ``w_b * topk_kl`` (each
    sequence's mean over its tokens, averaged over sequences, denominator ``seq_denominator``).
    Both denominators default to this batch; pass the global ones (``loss_denominator``) when
    micro-batching. ``weights`` [B] come from ``proxy_sample_weights`` over the whole batch.

    Args:
        student_logits, proxy_logits: [B, T, V], position t predicts ``labels[:, t]``.
        labels: [B, T] response token ids (valid ids everywhere; padding masked by ``mask``).

    Returns:
        (loss, metrics) with ``ce``, ``kd`` (the weighted KD term, before alpha) and
        ``weight_mean``.
    """
    if proxy_logits.dim() != 3 or proxy_logits.shape != student_logits.shape:
        raise ValueError(
            f"proxy_logits {tuple(proxy_logits.shape)} and student_logits "
            f"{tuple(student_logits.shape)} must both be [B, T, V] of the same shape (shared "
            f"tokenizer)"
        )
    _check_weights(weights, mask)
    top_logp, top_ids = proxy_topk(proxy_logits, k)
    return proxy_kd_loss_topk(
        student_logits,
        top_logp,
        top_ids,
        labels,
        mask,
        weights,
        alpha,
        token_denominator,
        seq_denominator,
    )


def proxy_kd_loss_topk(
    student_logits: torch.Tensor,
    top_logp: torch.Tensor,
    top_ids: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 1.0,
    token_denominator: float | None = None,
    seq_denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``proxy_kd_loss`` from precomputed proxy targets ``proxy_topk(proxy_logits, k)``."""
    _check_weights(weights, mask)
    logp = token_logprobs(student_logits, labels)
    kl = topk_kl_from_targets(top_logp, top_ids, student_logits, mask)
    return proxy_kd_loss_from_terms(
        logp, kl, mask, weights, alpha, token_denominator, seq_denominator
    )


def proxy_kd_loss_from_terms(
    logp: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 1.0,
    token_denominator: float | None = None,
    seq_denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``proxy_kd_loss`` from its per-token terms [B, T]: the student's log-probs of the labels
    (``token_logprobs``) and ``topk_kl``, however they were computed (e.g. at the response
    positions of a packed micro-batch only, scattered back to [B, T])."""
    _check_weights(weights, mask)
    ce = aggregate_loss(sft_loss_mat(logp), mask, "token-mean", token_denominator)
    kd = aggregate_loss(
        weights.detach()[:, None] * kl, mask, "seq-mean-token-mean", seq_denominator
    )
    metrics = {"ce": ce.item(), "kd": kd.item(), "weight_mean": weights.float().mean().item()}
    return ce + alpha * kd, metrics
