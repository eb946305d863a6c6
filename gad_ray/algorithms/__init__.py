"""GAD's losses and advantages as pure tensor functions (docs/algorithms.md §2 and §4; code map §6); depends only on torch."""

from .advantages import broadcast_to_tokens, grpo_advantages
from .losses import (
    bt_loss,
    dpo_loss,
    proxy_kd_loss,
    proxy_kd_loss_from_terms,
    proxy_kd_loss_topk,
    proxy_sample_weights,
    proxy_topk,
    seq_mean_logp,
    sft_loss_mat,
    topk_kl,
    topk_kl_from_targets,
)
from .policy import (
    AGG_MODES,
    AggMode,
    KLKind,
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    loss_denominator,
    ppo_clip_loss,
    token_logprobs,
)

__all__ = [
    "AGG_MODES",
    "AggMode",
    "KLKind",
    "aggregate_loss",
    "broadcast_to_tokens",
    "bt_loss",
    "dpo_loss",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "loss_denominator",
    "ppo_clip_loss",
    "proxy_kd_loss",
    "proxy_kd_loss_from_terms",
    "proxy_kd_loss_topk",
    "proxy_sample_weights",
    "proxy_topk",
    "seq_mean_logp",
    "sft_loss_mat",
    "token_logprobs",
    "topk_kl",
    "topk_kl_from_targets",
]
