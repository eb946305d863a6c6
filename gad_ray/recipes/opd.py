"""On-policy distillation from a white-box teacher (docs/algorithms.md §7; GKD, Agarwal et al.,
arXiv 2306.13649; MiniLLM, Gu et al., arXiv 2306.08543). No discriminator. Per on-policy step,
after the driver has sampled ``y ~ G`` (n per prompt, at T):

    log T(y_t), log G(y_t)       the frozen teacher's and the sampling policy's, at T
    A_t = log T(y_t) - log G(y_t)              per token (opd_advantages)
    G <- PPO-clip(A) + kl_coef * KL(G || ref)  (the reference: the initial student)

A share ``1 - lmbda`` of the steps, spread evenly, is teacher-forced instead: G <- SFT(y_t) on the
teacher data's responses (no sampling). Each run of steps of one kind is a stage, so the driver
samples only for the on-policy ones.

The teacher is the role ``teacher_model``: ``algorithm.opd.teacher`` (any local model sharing the
student's tokenizer, e.g. Proxy-KD's ``<run_dir>/proxy`` export) loaded frozen into a generator
learner that only computes log-probs; it is never checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gad_ray.algorithms.advantages import opd_advantages
from gad_ray.config.schema import Config
from gad_ray.models.loading import check_same_tokenizer, load_tokenizer, resolve_model_path
from gad_ray.recipes.stages import Recipe, Sampling, Stage, StepDriver, StepInput, sample_stats
from gad_ray.rollout.types import SamplingParams

TEACHER = "teacher_model"


def check(cfg: Config) -> Iterator[str]:
    o, g = cfg.algorithm.opd, cfg.algorithm.grpo
    if o.teacher is None:
        yield "algorithm.opd.teacher is required when algorithm.name=opd (a model path or spec)"
    elif o.teacher.lora.enabled:
        yield "algorithm.opd.teacher.lora.rank > 0: the teacher is frozen; it has no adapter"
    if g.top_p < 1:
        yield (
            f"algorithm.grpo.top_p={g.top_p}: on-policy distillation scores the samples with the "
            "full softmax(logits / algorithm.grpo.temperature) of the student and the teacher; "
            "set algorithm.grpo.top_p=1.0 for algorithm.name=opd"
        )


def teacher_view(cfg: Config) -> Config:
    """A copy of ``cfg`` with the teacher in the student's place (model spec, ranks): the
    generator learner code loads it, frozen, for its log-probs."""
    o = cfg.algorithm.opd
    if o.teacher is None:
        raise ValueError("algorithm.opd.teacher is not set: on-policy distillation needs one")
    view = cfg.model_copy(deep=True)
    view.model.student = o.teacher.model_copy()
    view.learner.generator_ranks = o.ranks
    return view


def check_teacher_tokenizer(cfg: Config) -> None:
    """Raise :class:`ModelLoadError` when the teacher's tokenizer differs from the student's:
    its log-probs must be of the student's token ids."""
    student, teacher = cfg.model.student, teacher_view(cfg).model.student
    check_same_tokenizer(
        load_tokenizer(resolve_model_path(student.tokenizer or student.path)),
        load_tokenizer(resolve_model_path(teacher.tokenizer or teacher.path)),
        f"student (model.student.path={student.path!r})",
        f"teacher (algorithm.opd.teacher.path={teacher.path!r})",
    )


def teacher_group(cfg: Config, student_path: str, cpus: float, place: Any, **_: Any) -> Any:
    """The ``teacher_model`` role (its entry in :mod:`gad_ray.role_specs`): ``algorithm.opd.
    ranks`` generator ranks holding the teacher, used only for ``compute_logprobs`` (no
    reference; its optimizer never steps)."""
    from gad_ray.learner.generator import GeneratorGroup

    check_teacher_tokenizer(cfg)
    view = teacher_view(cfg)
    path = resolve_model_path(view.model.student.path)
    group = GeneratorGroup(view, path, with_reference=False, cpus_per_rank=cpus, placement=place)
    group.role = TEACHER  # its errors name the role
    return group


def on_policy(step: int, lmbda: float) -> bool:
    """Whether step ``step`` samples from the student: ``floor((i + 1) lmbda) > floor(i lmbda)``,
    so any ``steps`` consecutive steps hold ``lmbda * steps`` on-policy ones (to +-1), evenly."""
    return math.floor((step + 1) * lmbda + 1e-9) > math.floor(step * lmbda + 1e-9)


def recipe(cfg: Config, steps_per_epoch: int, run_dir: Path) -> Recipe:
    o, g = cfg.algorithm.opd, cfg.algorithm.grpo
    params = SamplingParams(g.n_samples, g.temperature, g.top_p, cfg.data.max_response_length)
    roles = ("rollout", "generator", TEACHER)
    stages: list[Stage] = []
    for i in range(o.steps):
        kind = on_policy(i, o.lmbda)
        if stages and (stages[-1].sampling is not None) == kind:
            stages[-1].steps += 1
            continue
        stages.append(
            Stage(
                "opd" if kind else "sft",
                1,
                roles,
                ("generator",),
                opd_step if kind else sft_step,
                sampling=Sampling(params) if kind else None,
                eval_label="before_distill" if i == 0 else None,
            )
        )
    with_reference = g.kl_coef > 0  # the KL anchor: the initial student
    return Recipe(
        stages,
        roles={
            "rollout": {},
            "generator": {"with_reference": with_reference, "total_steps": o.steps},
            TEACHER: {},
        },
    )


def sft_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    """Teacher-forced: G imitates the teacher data's responses."""
    return d.update({"generator": lambda gen: gen.train_sft(x.teacher)})


def opd_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    """Score the student's samples with the teacher; PPO-clip on the per-token advantages."""
    temp, mask = x.sampling.temperature, x.student.response_mask
    with d.timer("teacher_logprobs", role=TEACHER):
        teacher = d.roles[TEACHER].compute_logprobs(x.student, temp)
    if d.cfg.learner.offload_idle:  # it waits on CPU while G trains (docs/plan.md)
        d.roles[TEACHER].offload()
    student = x.old_logprobs  # the sampling policy's; the current one's when on-policy
    if student is None:
        with d.timer("student_logprobs"):
            student = d.roles["generator"].compute_logprobs(x.student, temp)
    adv = opd_advantages(teacher, student, mask)
    metrics = sample_stats(x.samples, x.teacher) | reverse_kl_stats(adv, mask)
    update = {
        "generator": lambda gen: gen.train_grpo(
            x.student, adv, x.old_logprobs, x.rollout_logprobs, temperature=temp
        )
    }
    return metrics | d.update(update)


def reverse_kl_stats(adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The sampled reverse KL(G || T) (the advantages' negative) per token and per sequence."""
    tokens = float(mask.sum())
    per_seq = -(adv * mask).sum(-1)
    return {
        "reverse_kl": -float((adv * mask).sum()) / tokens,
        "reverse_kl_seq": per_seq.mean().item(),
        "adv_min": adv[mask.bool()].min().item(),
        "adv_max": adv[mask.bool()].max().item(),
    }
