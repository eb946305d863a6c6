"""GRPO advantages: rewards normalised within each prompt's group of samples (docs/algorithms.md §2.3)."""

import torch


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages, one per sample.

    For sample i in group g (the n samples of one prompt):
        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)    if norm_by_std
        A_i =  r_i - mean_g(r)                         otherwise
    with the unbiased std (divisor n_g - 1). A group of one sample gets A = 0.
    Groups may be of unequal size and their samples may appear in any order.

    Args:
        rewards: float [B], one scalar reward per sample.
        group_ids: integer [B], equal ids mark samples of the same prompt (any values).
        norm_by_std: divide by the group's std (GRPO) or only centre (Dr. GRPO style).
        eps: added to the std so that a group of equal rewards gets A = 0.

    Returns:
        float [B] advantages (detached, same dtype as ``rewards``).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of the same length, got rewards "
            f"{tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"reward at index {i} is not finite: {rewards[i].item()}")
    r = rewards.detach()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    counts = counts.to(r.dtype)
    mean = torch.zeros_like(counts).index_add_(0, inverse, r) / counts
    centred = r - mean[inverse]
    single = counts[inverse] < 2
    if norm_by_std:
        sq = torch.zeros_like(counts).index_add_(0, inverse, centred.square())
        std = (sq / (counts - 1).clamp(min=1)).sqrt()
        centred = centred / (std[inverse] + eps)
    return torch.where(single, torch.zeros_like(centred), centred)


def broadcast_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Copy each sample's advantage onto its response tokens: ``adv[:, None] * mask`` -> [B, T].

    Args:
        adv: float [B] sequence-level advantages.
        mask: float/bool [B, T], 1 on real response tokens, 0 on padding.
    """
    if mask.dim() != 2 or adv.shape != mask.shape[:1]:
        raise ValueError(
            f"expected adv [B] and mask [B, T], got adv {tuple(adv.shape)} and mask "
            f"{tuple(mask.shape)}"
        )
    return adv[:, None] * mask.to(adv.dtype)


def opd_advantages(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """On-policy distillation's per-token advantages (docs/algorithms.md §7): on the student's
    own sample ``y ~ G(x)``, token t gets

        A_t = log T(y_t | x, y_<t) - log G(y_t | x, y_<t)

    the negative of the single-sample estimate of the per-token reverse KL(G || T). No group
    normalisation and no sum over later tokens: each token is credited with its own term.

    Args:
        teacher_logprobs: float [B, T], the frozen teacher's log-probs of the sampled tokens.
        student_logprobs: float [B, T], the sampling policy's log-probs of the same tokens (at
            the same temperature).
        mask: float/bool [B, T], 1 on the response tokens, 0 on the prompt and padding.

    Returns:
        float [B, T] advantages, zero off the response (detached, ``teacher_logprobs``' dtype).
    """
    if not (teacher_logprobs.dim() == 2 and teacher_logprobs.shape == student_logprobs.shape):
        raise ValueError(
            f"teacher_logprobs and student_logprobs must both be [B, T], got "
            f"{tuple(teacher_logprobs.shape)} and {tuple(student_logprobs.shape)}"
        )
    if mask.shape != teacher_logprobs.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected {tuple(teacher_logprobs.shape)}"
        )
    keep = mask.bool()
    diff = teacher_logprobs.detach() - student_logprobs.detach().to(teacher_logprobs.dtype)
    bad = (~torch.isfinite(diff) & keep).nonzero()
    if bad.numel():
        b, t = (int(i) for i in bad[0])
        raise ValueError(f"log-prob difference at row {b}, token {t} is not finite: {diff[b, t]}")
    return torch.where(keep, diff, torch.zeros_like(diff))
