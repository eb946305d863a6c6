"""The engine of ``learner.backend``: FSDP2 (:mod:`gad_ray.learner.engine`) or DeepSpeed
(:mod:`gad_ray.learner.deepspeed_engine`, imported only when chosen)."""

from __future__ import annotations

import torch
from torch import nn

from gad_ray.config.schema import LearnerConfig, OptimConfig
from gad_ray.learner.engine import Engine, FSDP2Engine, Selector, build_frozen_fsdp


def build_engine(
    model: nn.Module,
    lcfg: LearnerConfig,
    ocfg: OptimConfig,
    device: torch.device,
    dtype: torch.dtype,
    total_steps: int | None = None,
    saved: Selector | None = None,
) -> Engine:
    """The engine of ``lcfg.backend`` training the parameters of ``model`` (an unwrapped
    HF-style model) that require grad, as fp32 masters, with ``dtype`` compute; ``saved`` picks
    the parameters its checkpoints hold (default: all)."""
    if lcfg.backend == "deepspeed":
        from gad_ray.learner.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, lcfg, ocfg, device, dtype, total_steps, saved)
    return FSDP2Engine(model, lcfg, ocfg, device, dtype, total_steps, saved=saved)


def build_frozen(
    model: nn.Module, lcfg: LearnerConfig, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """A forward-only copy in the compute ``dtype``, sharded like the trained model
    (``learner.reference_offload`` on GPU keeps its shards on CPU)."""
    if lcfg.backend == "deepspeed":
        from gad_ray.learner.deepspeed_engine import build_frozen_deepspeed

        model.requires_grad_(False).to(dtype)
        return build_frozen_deepspeed(model, lcfg, device, dtype)
    return build_frozen_fsdp(model, lcfg, device, dtype)
