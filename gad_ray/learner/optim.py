"""AdamW and its learning-rate schedule (constant or linear warmup + cosine decay)."""

import math
from collections.abc import Iterable

import torch

from gad_ray.config.schema import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable ``params`` with the config's lr, betas, eps and weight decay."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int | None) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based).

    Linear warmup over ``cfg.warmup_steps`` (step s uses (s+1)/warmup), then constant or a
    cosine decay from 1 to ``cfg.min_lr_ratio`` at ``total_steps``.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(
            "optim schedule 'cosine' needs total_steps (the number of optimizer steps)"
        )
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following :func:`lr_factor`; raises early when cosine lacks ``total_steps``."""
    if cfg.schedule == "cosine" and total_steps is None:
        raise ValueError(
            "optim schedule 'cosine' needs total_steps (the number of optimizer steps)"
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps)
    )


def set_base_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Give a LambdaLR schedule a new base LR, keeping its position (the factor stays)."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr for _ in groups]
    for group, fn in zip(groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)
