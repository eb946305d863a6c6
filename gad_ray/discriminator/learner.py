"""The discriminator learner: scores and Bradley-Terry steps (docs/algorithms.md §2) over N Ray
actors.

A BT step pairs each student row j with teacher row ``pair_teacher_index[j]``. The loss of a
pair is nonlinear in BOTH of its scores, so a micro-batch holding a student row without its
teacher row cannot compute its own share of the loss: the step is the exact two-pass surrogate
step of :meth:`~gad_ray.learner.group.LearnerGroup.surrogate_step` over ONE combined batch
(teacher rows, then student rows), micro-batched and spread over ranks freely; a teacher row
shared by n pairs is forwarded once per pass. Every response reaching D ends the same way
(:class:`~gad_ray.discriminator.ends.ResponseEnds`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification

from gad_ray.algorithms import bt_loss
from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, concat_batches
from gad_ray.discriminator.ends import ResponseEnds
from gad_ray.discriminator.model import (
    DiscriminatorModel,
    check_discriminator_tokenizer,
    discriminator_source,
)
from gad_ray.learner.backends import build_engine
from gad_ray.learner.checkpoint import export_hf
from gad_ray.learner.engine import MASTER_DTYPE, compute_dtype
from gad_ray.learner.group import LearnerGroup
from gad_ray.learner.load_once import empty_tensors, reads_weights
from gad_ray.learner.lora import (
    DISCRIMINATOR,
    adapter_config,
    add_adapters,
    export_lora,
    is_lora_param,
)
from gad_ray.learner.packing import MicroBatch, discriminator_scores
from gad_ray.learner.worker import LearnerWorker
from gad_ray.models.loading import load_tokenizer, model_max_context
from gad_ray.models.score_head import last_response_index
from gad_ray.placement import RolePlacement


def _check_batch(batch: TokenBatch, name: str, method: str) -> None:
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"{method}: {name} must be a TokenBatch, got {type(batch).__name__}")
    if len(batch) == 0:
        raise ValueError(f"{method}: {name} is empty")
    try:
        last_response_index(batch.response_mask)
    except ValueError as e:
        raise ValueError(f"{method}: {name}: {e}") from None


class DiscriminatorWorker(LearnerWorker):
    """One rank of the discriminator learner."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world_size: int,
        role: str,
        num_threads: int,
        model_path: str,
        tokenizer_path: str,
        total_steps: int | None,
    ) -> None:
        super().__init__(cfg, rank, world_size, role, num_threads)
        self.model_path, self.tokenizer_path = model_path, tokenizer_path
        self.total_steps = total_steps

    def setup(self) -> None:
        spec = self.cfg.model.discriminator
        dtype = compute_dtype(spec, self.device)
        lora = spec.lora.enabled  # the backbone frozen in the compute dtype, adapter + head fp32
        empty = not reads_weights()  # rank 0 reads the weights, the engine broadcasts them
        model = DiscriminatorModel.from_pretrained(
            self.model_path,
            dtype=dtype if lora else MASTER_DTYPE,
            seed=self.cfg.seed,
            head_dtype=MASTER_DTYPE,
            empty=empty,
        )
        saved = None
        if lora:
            self.lora_specs = {DISCRIMINATOR: spec.lora}
            with empty_tensors(empty):
                model.model = add_adapters(model.model, self.lora_specs, self.cfg.seed)
            saved = lambda n: is_lora_param(n) or n.startswith("score.")  # noqa: E731
        self.hf_config = model.config
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optim = self.cfg.algorithm.discriminator_optim
        self.engine = build_engine(
            model, self.cfg.learner, optim, self.device, dtype, self.total_steps, saved
        )

    def scorer(self) -> Callable[..., torch.Tensor]:
        """D's forward: ``(input_ids, attention_mask, response_mask | last_index,
        position_ids) -> scores [B]`` (:class:`~gad_ray.discriminator.model.DiscriminatorModel`)."""
        return self.engine.module

    def row_values(self, mb: MicroBatch) -> torch.Tensor:
        """``D(x, y)`` [b, 1] of each row (the surrogate step's value)."""
        return discriminator_scores(self.scorer(), mb)[:, None]

    def save_pretrained(self, path: str) -> None:
        """HF ``ForSequenceClassification`` export (+ the student's tokenizer) by rank 0, in
        the compute dtype; with LoRA merged or as an adapter (``model.discriminator.lora.
        export``)."""
        spec = self.cfg.model.discriminator
        with self.onloaded():
            lora = self.lora_specs
            state = self.engine.full_state_dict(None if lora else self.engine.dtype)
            config = (
                adapter_config(self.engine.module, DISCRIMINATOR, self.model_path) if lora else {}
            )
        if self.rank == 0:
            tok = load_tokenizer(self.tokenizer_path)
            cls = AutoModelForSequenceClassification
            if not lora:
                export_hf(path, state, self.hf_config, tok, cls)
            else:
                args = (spec.lora, config, self.engine.dtype, tok, self.hf_config, cls, "model.")
                export_lora(path, state, DISCRIMINATOR, *args)
        dist.barrier()


class DiscriminatorGroup(LearnerGroup):
    """``cfg.learner.discriminator_ranks`` actors training D (docs/algorithms.md §2.2)."""

    def __init__(
        self,
        cfg: Config,
        model_path: str | None = None,
        total_steps: int | None = None,
        cpus_per_rank: float = 1,
        placement: RolePlacement | None = None,
    ) -> None:
        """``model_path`` defaults to ``model.discriminator.path`` (``student``: the student's
        checkpoint). The discriminator's tokenizer must equal the student's (checked here)."""
        path = model_path or discriminator_source(cfg)
        model_max_context(path)  # fails fast on the host with ModelLoadError naming the path
        check_discriminator_tokenizer(cfg)
        self.ends = ResponseEnds.of(cfg)
        self.updates, self.scored = 0, None  # BT steps taken; the last score() and when
        student = cfg.model.student
        super().__init__(
            DiscriminatorWorker,
            cfg,
            cfg.learner.discriminator_ranks,
            "discriminator",
            cpus_per_rank,
            placement=placement,
            model_path=path,
            tokenizer_path=student.tokenizer or student.path,
            total_steps=total_steps,
        )

    def score(self, batch: TokenBatch) -> torch.Tensor:
        """``D(x, y)`` [B]: the head's output at each row's last response token."""
        _check_batch(batch, "batch", "DiscriminatorGroup.score")
        scores = self.gather_rows("surrogate_values", self.ends.normalise(batch))[:, 0]
        self.scored = (batch, scores, self.updates)
        return scores

    def train_bt(
        self,
        teacher: TokenBatch,
        student: TokenBatch,
        pair_teacher_index: torch.Tensor,
        student_scores: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One optimizer step of the BT loss over the pairs (teacher row
        ``pair_teacher_index[j]``, student row j); returns ``d_loss``, ``d_acc``,
        ``teacher_score_mean``, ``student_score_mean`` (before the update), ``grad_norm``, ``lr``,
        ``tokens_per_s``.

        ``student_scores``: what :meth:`score` returned for ``student`` since D's last update
        (the same weights, so exactly the no-grad pass's values of those rows): the no-grad
        pass then forwards the teacher rows only (docs/algorithms.md §2.8). Scores of another
        batch, or from before an update, raise ValueError."""
        method = "DiscriminatorGroup.train_bt"
        _check_batch(teacher, "teacher", method)
        _check_batch(student, "student", method)
        idx = torch.as_tensor(pair_teacher_index, dtype=torch.long)
        if idx.shape != (len(student),):
            raise ValueError(
                f"{method}: pair_teacher_index has shape {tuple(idx.shape)}, expected "
                f"[{len(student)}] (one teacher row per student row)"
            )
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(teacher)):
            raise ValueError(
                f"{method}: pair_teacher_index values must lie in [0, {len(teacher)}), got "
                f"min {int(idx.min())} max {int(idx.max())}"
            )
        n, ends = len(teacher), self.ends.normalise
        batch = concat_batches(ends(teacher), ends(student))
        values = None
        if student_scores is not None:
            scored_batch, scores, at = self.scored or (None, None, None)
            if not (scores is student_scores and scored_batch is student and at == self.updates):
                raise ValueError(
                    f"{method}: student_scores must be what score() returned for this student "
                    f"batch since D's last update (D has taken {self.updates} updates)"
                )
            teacher_values = self.gather_rows("surrogate_values", ends(teacher))
            values = torch.cat([teacher_values, student_scores[:, None].to(teacher_values)])

        def loss(values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            scores = values[:, 0]
            return bt_loss(scores[:n][idx], scores[n:], "mean")

        metrics = self.surrogate_step(batch, loss, values)
        self.updates += 1
        return metrics

    def load_checkpoint(self, path: str) -> None:
        super().load_checkpoint(path)
        self.updates += 1  # new weights: earlier scores are stale
