"""One learner group for G and D over ONE frozen base (``learner.shared_base=true``, LoRA).

Each rank holds a single copy of the student's weights (frozen, compute dtype) carrying three
LoRA adapters: G's (trained), the KL reference's (G's as warmup left it, frozen) and D's
(trained), plus D's scalar head (trained) on the base's last hidden state. Two FSDP2 engines
share the sharded module: G's optimizer steps G's adapter, D's steps D's adapter and head, each
with its own AdamW state, LR schedule and gradient clipping, so a step equals the step of a
separate LoRA learner (tested). The group serves both the ``generator`` and the
``discriminator`` role (:class:`~gad_ray.driver.roles.Roles`); their calls share the actors, so
D || G overlap is off for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch

from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch
from gad_ray.discriminator.ends import ResponseEnds
from gad_ray.discriminator.learner import DiscriminatorGroup, DiscriminatorWorker
from gad_ray.discriminator.model import (
    check_discriminator_tokenizer,
    discriminator_config,
    new_head,
)
from gad_ray.learner.engine import Engine, FSDP2Engine, compute_dtype
from gad_ray.learner.generator import GeneratorGroup, GeneratorWorker
from gad_ray.learner.group import LearnerGroup
from gad_ray.learner.lora import (
    DISCRIMINATOR,
    GENERATOR,
    REFERENCE,
    is_adapter_param,
)
from gad_ray.learner.worker import LearnerWorker
from gad_ray.models.loading import model_max_context
from gad_ray.placement import RolePlacement

D_STATE = "discriminator"  # sub-directory of a checkpoint with D's optimizer, schedule, weights


def _is_d(name: str) -> bool:
    return is_adapter_param(name, DISCRIMINATOR) or name.startswith("score.")


def _is_g(name: str) -> bool:
    return is_adapter_param(name, GENERATOR)


def _is_g_saved(name: str) -> bool:
    return is_adapter_param(name, GENERATOR) or is_adapter_param(name, REFERENCE)


class SharedWorker(GeneratorWorker, DiscriminatorWorker):
    """One rank: the base, G's, the reference's and D's adapters, D's head, two engines.
    ``self.engine`` is G's; D's calls run with D's engine in its place (:meth:`acting`)."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world_size: int,
        role: str,
        num_threads: int,
        model_path: str,
        tokenizer_path: str,
        with_reference: bool,
        total_steps: int | None,
    ) -> None:
        LearnerWorker.__init__(self, cfg, rank, world_size, role, num_threads)
        self.model_path, self.tokenizer_path = model_path, tokenizer_path
        self.with_reference, self.total_steps = with_reference, total_steps
        self.reference = None
        self.engines: dict[str, Engine] = {}

    def setup(self) -> None:
        s, d, alg = self.cfg.model.student, self.cfg.model.discriminator, self.cfg.algorithm
        dtype = compute_dtype(s, self.device)
        model = self.adapter_model(dtype, {DISCRIMINATOR: d.lora})
        model.score = new_head(discriminator_config(model.config), self.cfg.seed)
        self.lora_specs = {GENERATOR: s.lora, DISCRIMINATOR: d.lora}
        g = FSDP2Engine(
            model,
            self.cfg.learner,
            alg.generator_optim,
            self.device,
            dtype,
            self.total_steps,
            trained=_is_g,
            saved=_is_g_saved,
        )
        self.engines = {
            GENERATOR: g,
            DISCRIMINATOR: g.view(alg.discriminator_optim, self.total_steps, _is_d, _is_d),
        }
        self.engine = g

    @contextmanager
    def acting(self, role: str) -> Iterator[None]:
        """Run the body with ``role``'s engine as ``self.engine``."""
        own, self.engine = self.engine, self.engines[role]
        try:
            yield
        finally:
            self.engine = own

    def scorer(self) -> Callable[..., torch.Tensor]:
        return partial(self.engines[DISCRIMINATOR].module, adapter=DISCRIMINATOR)

    # -- D's calls ----------------------------------------------------------------------------
    def surrogate_values(
        self, batch: TokenBatch, plan: list[list[int]]
    ) -> tuple[list[int], list[torch.Tensor]]:
        with self.acting(DISCRIMINATOR):
            return DiscriminatorWorker.surrogate_values(self, batch, plan)

    def train_surrogate(
        self, batch: TokenBatch, plan: list[list[int]], coef: torch.Tensor
    ) -> dict[str, float]:
        with self.acting(DISCRIMINATOR):
            return DiscriminatorWorker.train_surrogate(self, batch, plan, coef)

    def save_discriminator(self, path: str) -> None:
        """D's HF export (merged, or its adapter + head)."""
        with self.acting(DISCRIMINATOR):
            DiscriminatorWorker.save_pretrained(self, path)

    # -- both engines -------------------------------------------------------------------------
    def offload(self, copy: bool = False) -> float:
        return sum(self._each("offload", copy))

    def onload(self, copy: bool = False) -> float:
        return sum(self._each("onload", copy))

    def _each(self, method: str, copy: bool) -> list[float]:
        out = []
        for role in self.engines:
            with self.acting(role):
                out.append(getattr(LearnerWorker, method)(self, copy))
        return out

    def save_checkpoint(self, path: str) -> None:
        """G's adapter, the reference's, D's adapter and head, both optimizers and schedules;
        D's in ``<path>/discriminator``."""
        with self.onloaded(), self.acting(DISCRIMINATOR):
            self.engine.save(os.path.join(path, D_STATE), {})
        GeneratorWorker.save_checkpoint(self, path)

    def load_checkpoint(self, path: str) -> None:
        GeneratorWorker.load_checkpoint(self, path)
        with self.onloaded(), self.acting(DISCRIMINATOR):
            self.engine.load(os.path.join(path, D_STATE), {})


class SharedGroup(GeneratorGroup, DiscriminatorGroup):
    """G and D over one frozen base in one group of ``learner.generator_ranks`` actors: the
    methods of both :class:`GeneratorGroup` and :class:`DiscriminatorGroup`."""

    role = "generator+discriminator"

    def __init__(
        self,
        cfg: Config,
        model_path: str | None = None,
        total_steps: int | None = None,
        with_reference: bool = True,
        cpus_per_rank: float = 1,
        placement: RolePlacement | None = None,
    ) -> None:
        path = model_path or cfg.model.student.path
        model_max_context(path)  # fails fast on the host with ModelLoadError naming the path
        check_discriminator_tokenizer(cfg)
        self.ends = ResponseEnds.of(cfg)  # D's input (DiscriminatorGroup.score, train_bt)
        self.updates, self.scored = 0, None  # D's BT steps; its last score() and when
        student = cfg.model.student
        LearnerGroup.__init__(
            self,
            SharedWorker,
            cfg,
            cfg.learner.generator_ranks,
            self.role,
            cpus_per_rank,
            placement=placement,
            model_path=path,
            tokenizer_path=student.tokenizer or path,
            with_reference=with_reference,
            total_steps=total_steps,
        )

    def save_discriminator(self, path: str) -> None:
        """D's HF export (``model.discriminator.lora.export``), written by rank 0."""
        self.run("save_discriminator", path)
