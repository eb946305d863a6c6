"""GAD, Generative Adversarial Distillation (docs/algorithms.md §2.6): a warmup stage, then the
adversarial stage. Per step, after the driver has sampled ``y_s ~ G`` (n per prompt, at T):

    warmup (warmup.epochs; the first warmup.d_only_steps update D only):
        D <- BT(y_t vs y_s)            y_s: D's negatives
        G <- SFT(y_t)
    GAD (gad.steps; the first gad.d_only_steps update D only):
        r = D(x, y_s)                  before D's update
        A = GRPO(r) within each prompt's group
        D <- BT(y_t vs y_s)   ||   G <- PPO-clip(A) + kl_coef * KL(G || ref)

The KL reference is the warmed-up student (reset on entering the GAD stage). ``D || G``: both
updates depend only on this step's samples, so they run at the same time when
``trainer.overlap_d_g`` is on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from gad_ray.algorithms import bt_loss, grpo_advantages
from gad_ray.config.schema import Config
from gad_ray.recipes.stages import (
    Recipe,
    Sampling,
    Stage,
    StepDriver,
    StepInput,
    prefix,
    reward_stats,
    sample_stats,
)
from gad_ray.rollout.types import SamplingParams

ROLES = ("rollout", "generator", "discriminator")
LEARNERS = ("generator", "discriminator")


def check(cfg: Config) -> Iterator[str]:
    g = cfg.algorithm.grpo
    if g.n_samples < 2:
        yield (
            f"algorithm.grpo.n_samples={g.n_samples}: GRPO needs at least 2 samples per prompt "
            f"for algorithm.name={cfg.algorithm.name}"
        )
    if g.top_p < 1:
        yield (
            f"algorithm.grpo.top_p={g.top_p}: G's policy gradient computes its log-probs on the "
            f"full softmax(logits / algorithm.grpo.temperature), so samples must come from "
            f"that distribution: set algorithm.grpo.top_p=1.0 for algorithm.name="
            f"{cfg.algorithm.name} (docs/placement.md, Sampling)"
        )


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    """``warmup.epochs`` of data (capped by ``warmup.max_steps``); 0 when both ablated."""
    w = cfg.algorithm.warmup
    if not (w.generator or w.discriminator):
        return 0
    steps = math.ceil(w.epochs * steps_per_epoch)
    return steps if w.max_steps is None else min(steps, w.max_steps)


def recipe(cfg: Config, steps_per_epoch: int, run_dir: Path, train_d_in_gad: bool = True) -> Recipe:
    alg, g = cfg.algorithm, cfg.algorithm.grpo
    sampling = Sampling(
        SamplingParams(g.n_samples, g.temperature, g.top_p, cfg.data.max_response_length)
    )
    warmup = warmup_steps(cfg, steps_per_epoch)
    total = warmup + alg.gad.steps
    gad = gad_step if train_d_in_gad else frozen_d_gad_step
    return Recipe(
        stages=[
            Stage(
                "warmup",
                warmup,
                ROLES,
                LEARNERS,
                warmup_step,
                sampling=sampling if alg.warmup.discriminator else None,
                on_enter=lambda d: d.roles["generator"].set_base_lr(warmup_lr(cfg)),
                eval_label="before_warmup",
            ),
            Stage(
                "gad",
                alg.gad.steps,
                ROLES,
                LEARNERS,
                gad,
                sampling=sampling,
                on_enter=enter_gad,
                eval_label="after_warmup",
            ),
        ],
        roles={
            "rollout": {},
            "generator": {"with_reference": True, "total_steps": total},
            "discriminator": {"total_steps": total},
        },
    )


def warmup_lr(cfg: Config) -> float:
    """G's SFT learning rate in warmup: ``warmup.generator_lr``, else ``generator_optim.lr``."""
    return cfg.algorithm.warmup.generator_lr or cfg.algorithm.generator_optim.lr


def enter_gad(d: StepDriver) -> None:
    """The KL anchor is the warmed-up student; G's LR switches to ``generator_optim.lr``."""
    gen = d.roles["generator"]
    gen.reset_reference()
    gen.set_base_lr(d.cfg.algorithm.generator_optim.lr)


def warmup_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    """D learns teacher vs the current student; G imitates the teacher (SFT)."""
    w, metrics, updates = d.cfg.algorithm.warmup, {}, {}
    if w.discriminator:
        metrics |= sample_stats(x.samples, x.teacher)
        updates["discriminator"] = lambda disc: disc.train_bt(x.teacher, x.student, x.pairs)
    if w.generator and not (w.discriminator and x.index < w.d_only_steps):
        updates["generator"] = lambda gen: gen.train_sft(x.teacher)
    return metrics | d.update(updates)


def gad_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    """Reward = D before its update; GRPO advantages; D's BT update || G's PPO update."""
    rewards, adv, metrics = score_and_advantages(d, x)
    k = d.cfg.algorithm.gad.d_steps_per_g_step
    updates = {"discriminator": lambda disc: d_steps(disc, x, k, rewards)}
    if x.index >= d.cfg.algorithm.gad.d_only_steps:
        updates["generator"] = lambda gen: grpo_step(gen, x, adv)
    return metrics | d.update(updates)


def frozen_d_gad_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    """The off-policy ablation: D stays as warmup left it; only G's PPO update runs."""
    rewards, adv, metrics = score_and_advantages(d, x)
    with d.timer("score"):
        teacher_scores = d.roles["discriminator"].score(x.teacher)
    metrics |= prefix("d_", bt_loss(teacher_scores[x.pairs], rewards)[1])
    updates = {}
    if x.index >= d.cfg.algorithm.gad.d_only_steps:
        updates["generator"] = lambda gen: grpo_step(gen, x, adv)
    return metrics | d.update(updates)


def score_and_advantages(d: StepDriver, x: StepInput) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``r = D(x, y_s)`` [B], the GRPO advantages ``A`` [B] and their metrics."""
    with d.timer("score", role="discriminator"):
        rewards = d.roles["discriminator"].score(x.student)
    advantages = grpo_advantages(rewards, x.pairs, d.cfg.algorithm.grpo.norm_adv_by_std)
    return (
        rewards,
        advantages,
        sample_stats(x.samples, x.teacher) | reward_stats(rewards, advantages),
    )


def grpo_step(gen: Any, x: StepInput, advantages: Tensor) -> dict[str, float]:
    """G's PPO update on the samples, its log-probs at the temperature they were drawn at."""
    return gen.train_grpo(
        x.student,
        advantages,
        x.old_logprobs,
        x.rollout_logprobs,
        temperature=x.sampling.temperature,
    )


def d_steps(disc: Any, x: StepInput, k: int, rewards: Tensor) -> dict[str, float]:
    """``k`` BT steps on the same pairs; the last step's metrics. The first reuses ``rewards``
    (D's scores of the student rows, before any of the k updates) as its no-grad pass over
    them; the later ones score them again with the updated D."""
    for i in range(k):
        metrics = disc.train_bt(x.teacher, x.student, x.pairs, rewards if i == 0 else None)
    return metrics
