"""What an algorithm declares, what its step functions receive, and what they may call.

An algorithm is a module of ``gad_ray/recipes/`` (see :mod:`gad_ray.recipes.registry`) that
returns a list of :class:`Stage`. The driver (:class:`~gad_ray.driver.driver.Driver`) runs the
stages in order: it keeps the stage's roles alive, samples what the stage asks for
(:class:`Sampling`, through its sampler: synchronously or one step ahead), calls the stage's
step function with itself (seen as a :class:`StepDriver`) and a :class:`StepInput`, and
checkpoints the roles the stage names. Step functions are a few lines each: role calls and pure
functions of :mod:`gad_ray.algorithms`. This module sits below the driver: the driver imports
it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch
from gad_ray.data.tokenize import TokenizedExample
from gad_ray.rollout.types import Sample, SamplingParams

Update = Callable[[Any], dict[str, Any]]  # one learner role's update: group -> its metrics


class RoleGroups(Protocol):
    """The live role groups, by role name (``d.roles["generator"]``)."""

    def __getitem__(self, name: str) -> Any: ...


class StepDriver(Protocol):
    """What step functions and stage hooks use of the driver."""

    cfg: Config
    roles: RoleGroups
    state: dict[str, Any]  # the recipe's own state, saved with each checkpoint

    def update(self, calls: dict[str, Update]) -> dict[str, Any]:
        """Run ``calls[role](group)`` for each learner role (concurrently when
        ``trainer.overlap_d_g``); their prefixed metrics."""
        ...

    def timer(self, phase: str, role: str | None = None) -> AbstractContextManager[None]:
        """Time ``phase`` into ``time/<phase>`` (with ``role``: also its peak memory)."""
        ...


@dataclass(frozen=True)
class Sampling:
    """Before each step, responses drawn with ``params`` from the ``rollout`` role, which
    serves the weights of the learner role ``policy`` (pushed to it whenever ``policy``
    changed)."""

    params: SamplingParams
    rollout: str = "rollout"
    policy: str = "generator"


@dataclass
class StepInput:
    """One step's data: the prompts with their teacher responses and, when the stage samples,
    the student batch (prompt + sample rows), each sample's prompt row, and the samples."""

    step: int  # global step
    index: int  # step within the stage
    examples: list[TokenizedExample]
    teacher: TokenBatch
    student: TokenBatch | None = None
    pairs: torch.Tensor | None = None  # [len(student)]: the prompt (teacher) row of each sample
    samples: list[Sample] | None = None
    sampling: SamplingParams | None = None  # what the samples were drawn with (n, T, ...)
    # the rollout's log-probs [B, T] of the samples' tokens (0 off the response): the measure of
    # the policy update's ``logprob_gap``
    rollout_logprobs: torch.Tensor | None = None
    # the same when the samples are off-policy (one-step-off pipeline, staleness > 0): PPO's old
    # log-probs; None when they come from the current weights (ratio 1)
    old_logprobs: torch.Tensor | None = None
    staleness: int = 0  # policy updates between the sampling weights and the trained ones


StepFn = Callable[[StepDriver, StepInput], dict[str, Any]]
Hook = Callable[[StepDriver], None]


@dataclass
class Stage:
    """A run of ``steps`` steps of one kind.

    ``roles``: the role groups alive during the stage (built by :mod:`gad_ray.driver.roles`);
    ``checkpoint``: the learner roles a checkpoint taken in this stage holds; ``on_enter`` runs
    when the stage is entered (not when a run resumes inside it: its effects are in the
    checkpoint), ``on_exit`` when it ends; ``eval_label``: the eval event logged on entering.
    """

    name: str
    steps: int
    roles: tuple[str, ...]
    checkpoint: tuple[str, ...]
    step: StepFn
    sampling: Sampling | None = None
    on_enter: Hook | None = None
    on_exit: Hook | None = None
    eval_label: str | None = None


@dataclass
class Recipe:
    """An algorithm's stages, in order, and the factory options of each role they use."""

    stages: list[Stage]
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def role_sets(self) -> list[tuple[str, ...]]:
        """The roles alive at once: one set per stage that runs."""
        return [s.roles for s in self.stages if s.steps > 0]


def sample_stats(samples: list[Sample], teacher: TokenBatch) -> dict[str, float]:
    """Sample lengths against the teacher's, and the share cut at ``max_response_length``."""
    lengths = torch.tensor([s.length for s in samples], dtype=torch.float32)
    teacher_len = teacher.response_lens.float().mean().item()
    return {
        "response_len_mean": lengths.mean().item(),
        "response_len_max": lengths.max().item(),
        "teacher_len_mean": teacher_len,
        "len_ratio": lengths.mean().item() / max(teacher_len, 1e-6),
        "truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
    }


def reward_stats(rewards: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "adv_mean": advantages.mean().item(),
        "adv_std": advantages.std().item() if advantages.numel() > 1 else 0.0,
        "adv_max": advantages.max().item(),
        "adv_min": advantages.min().item(),
    }


def prefix(p: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with every key starting with ``p``."""
    return {(k if k.startswith(p) else p + k): v for k, v in metrics.items()}
