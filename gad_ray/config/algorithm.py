"""The ``algorithm`` section: the optimizers, GRPO, the GAD stages, Proxy-KD."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, model_validator

from gad_ray.config.base import Strict
from gad_ray.config.model import ModelSpec


class OptimConfig(Strict):
    """AdamW with a constant or warmup+cosine schedule."""

    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class GRPOConfig(Strict):
    """Sampling, advantages and the PPO-clip objective of docs/algorithms.md §2.3-§2.4."""

    n_samples: int = Field(8, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    norm_adv_by_std: bool = True
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(None, gt=1)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    kl_coef: float = Field(0.001, ge=0)
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    entropy_coef: float = 0.0


class WarmupConfig(Strict):
    """Warmup stage: G does SFT on teacher responses, D does BT against G's samples."""

    generator: bool = True
    discriminator: bool = True
    epochs: float = Field(1.0, ge=0)
    max_steps: int | None = Field(None, ge=0)
    generator_lr: float | None = Field(None, gt=0)  # G's SFT lr in warmup; None: generator_optim.lr
    d_only_steps: int = Field(0, ge=0)  # the first k warmup steps update D only (authors: 10)


class GADStageConfig(Strict):
    steps: int = Field(1600, ge=0)
    d_only_steps: int = Field(0, ge=0)  # the first k GAD steps update D only
    d_steps_per_g_step: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _deprecated_critic_warmup(cls, raw: Any) -> Any:
        """``critic_warmup`` (GAD has no critic) is the old name of ``d_only_steps``."""
        if not isinstance(raw, dict) or "critic_warmup" not in raw:
            return raw
        raw = dict(raw)
        old = raw.pop("critic_warmup")
        if old is not None:
            warnings.warn(
                f"algorithm.gad.critic_warmup={old} is deprecated (GAD has no critic); "
                "use algorithm.gad.d_only_steps (taken as its value now)",
                FutureWarning,
                stacklevel=2,
            )
            raw["d_only_steps"] = old
        return raw


class ProxyKDConfig(Strict):
    """Proxy-KD (docs/algorithms.md §4): proxy SFT, iterative DPO, then student distillation."""

    proxy: ModelSpec | None = None
    ranks: int = Field(1, ge=1)  # learner ranks of the proxy (its rollout: rollout.num_workers)
    sft_fraction: float = Field(0.1, gt=0, lt=1)
    dpo_fraction: float = Field(0.2, gt=0, lt=1)
    dpo_iterations: int = Field(2, ge=1)
    dpo_beta: float = Field(0.1, gt=0)
    dpo_sft_weight: float = Field(1.0, ge=0)  # weight of -logp(chosen) in the DPO loss
    dpo_temperature: float = Field(1.0, gt=0)
    dpo_top_p: float = Field(0.8, gt=0, le=1)
    alpha: float = Field(1.0, ge=0)
    top_k: int = Field(10, ge=1)
    weight_temperature: float = Field(0.4, gt=0)
    proxy_optim: OptimConfig = OptimConfig(lr=1e-6)


class OPDConfig(Strict):
    """On-policy distillation from a white-box teacher (docs/algorithms.md §7)."""

    teacher: ModelSpec | None = None  # frozen, the student's tokenizer (a Proxy-KD export too)
    ranks: int = Field(1, ge=1)  # learner ranks of the frozen teacher
    steps: int = Field(64, ge=0)
    lmbda: float = Field(1.0, ge=0, le=1)  # share of steps on-policy; the rest SFT on y_t


class AlgorithmConfig(Strict):
    name: str  # a module of gad_ray/recipes/ (gad, seqkd, gad_frozen_d, proxy_kd, ...)
    warmup: WarmupConfig = WarmupConfig()
    gad: GADStageConfig = GADStageConfig()
    grpo: GRPOConfig = GRPOConfig()
    generator_optim: OptimConfig = OptimConfig(lr=1e-6, grad_clip=0.2)
    discriminator_optim: OptimConfig = OptimConfig(lr=1e-6, grad_clip=0.2)
    proxy_kd: ProxyKDConfig = ProxyKDConfig()
    opd: OPDConfig = OPDConfig()
