"""The discriminator learner: scores and Bradley-Terry steps (SPEC §2) over N Ray actors.

A BT step pairs each student row j with teacher row ``pair_teacher_index[j]``. The loss of a
pair is nonlinear in BOTH of its scores, so a micro-batch holding a student row without its
teacher row cannot compute its own share of the loss. We therefore take the step in two passes
over ONE combined batch (teacher rows, then student rows), micro-batched and spread over ranks
freely (token-balanced, like any other batch):

1. a no-grad forward scores every row (dropout is 0, so this equals the training forward);
2. on the host, autograd of the global loss ``L = mean over pairs of -log sigmoid(t - s)`` with
   respect to those scores gives ``c_i = dL/dscore_i`` (already divided by the global pair count);
3. a training pass backpropagates the surrogate ``sum_i c_i * score_i(theta)`` per micro-batch.

By the chain rule the accumulated gradient is exactly ``dL/dtheta``, for any split into ranks
and micro-batches; a teacher row shared by n pairs is forwarded once per pass. The price is the
extra no-grad forward (about a third of a forward+backward).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification

from gad_ray.algorithms import bt_loss
from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch
from gad_ray.discriminator.model import (
    DiscriminatorModel,
    check_discriminator_tokenizer,
    discriminator_source,
    last_response_index,
)
from gad_ray.learner.checkpoint import export_hf
from gad_ray.learner.engine import MASTER_DTYPE, build_engine, compute_dtype
from gad_ray.learner.group import LearnerGroup
from gad_ray.learner.worker import LearnerWorker
from gad_ray.models.loading import load_tokenizer, model_max_context
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


def concat_batches(a: TokenBatch, b: TokenBatch) -> TokenBatch:
    """Rows of ``a`` then rows of ``b``, right-padded (pad id 0, masked) to the longer width."""
    t = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]))

    return TokenBatch(
        input_ids=torch.cat([pad(a.input_ids), pad(b.input_ids)]),
        attention_mask=torch.cat([pad(a.attention_mask), pad(b.attention_mask)]),
        response_mask=torch.cat([pad(a.response_mask), pad(b.response_mask)]),
        prompt_lens=torch.cat([a.prompt_lens, b.prompt_lens]),
        response_lens=torch.cat([a.response_lens, b.response_lens]),
    )


def bt_score_grads(
    teacher_scores: torch.Tensor, student_scores: torch.Tensor, pair_teacher_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``dL/dscore`` for the teacher [Bt] and student [Bs] rows of the global mean BT loss
    ``L``, plus the metrics of ``bt_loss`` over all pairs."""
    t = teacher_scores.detach().double().requires_grad_(True)
    s = student_scores.detach().double().requires_grad_(True)
    loss, metrics = bt_loss(t[pair_teacher_index], s, "mean")
    loss.backward()
    return t.grad.float(), s.grad.float(), metrics


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
        model = DiscriminatorModel.from_pretrained(
            self.model_path, dtype=MASTER_DTYPE, seed=self.cfg.seed
        )
        self.hf_config = model.config
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optim = self.cfg.algorithm.discriminator_optim
        dtype = compute_dtype(spec, self.device)
        self.engine = build_engine(
            model, self.cfg.learner, optim, self.device, dtype, self.total_steps
        )

    def _scores(self, mb: TokenBatch) -> torch.Tensor:
        return self.engine.module(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, response_mask=mb.response_mask
        )

    def scores(
        self, batch: TokenBatch, plan: list[list[int]]
    ) -> tuple[list[int], list[torch.Tensor]]:
        self.engine.module.eval()
        return self.forward_plan(batch, plan, self._scores)

    def train_surrogate(
        self, batch: TokenBatch, plan: list[list[int]], coef: torch.Tensor
    ) -> dict[str, float]:
        """One optimizer step on ``sum_i coef_i * score_i`` (see the module docstring)."""

        def loss_fn(rows: list[int], mb: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
            c = coef[rows].to(self.device)
            return (c * self._scores(mb).float()).sum(), {}

        return self.train_step(batch, plan, loss_fn)

    def save_pretrained(self, path: str) -> None:
        """HF ``ForSequenceClassification`` export (+ the student's tokenizer) by rank 0, in
        the compute dtype."""
        with self.onloaded():
            state = self.engine.full_state_dict(self.engine.dtype)
        if self.rank == 0:
            tok = load_tokenizer(self.tokenizer_path)
            export_hf(path, state, self.hf_config, tok, AutoModelForSequenceClassification)
        dist.barrier()


class DiscriminatorGroup(LearnerGroup):
    """``cfg.learner.discriminator_ranks`` actors training D (SPEC §2)."""

    def __init__(
        self,
        cfg: Config,
        model_path: str | None = None,
        total_steps: int | None = None,
        cpus_per_rank: int = 1,
        placement: RolePlacement | None = None,
    ) -> None:
        """``model_path`` defaults to ``model.discriminator.path`` (``student``: the student's
        checkpoint). The discriminator's tokenizer must equal the student's (checked here)."""
        path = model_path or discriminator_source(cfg)
        model_max_context(path)  # fails fast on the host with ModelLoadError naming the path
        check_discriminator_tokenizer(cfg)
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

    def _score_all(self, batch: TokenBatch) -> torch.Tensor:
        out = torch.zeros(len(batch), dtype=torch.float32)
        for indices, rows in self.run_batch("scores", batch):
            for i, row in zip(indices, rows, strict=True):
                out[i] = row
        return out

    def score(self, batch: TokenBatch) -> torch.Tensor:
        """``D(x, y)`` [B]: the head's output at each row's last response token."""
        _check_batch(batch, "batch", "DiscriminatorGroup.score")
        return self._score_all(batch)

    def train_bt(
        self, teacher: TokenBatch, student: TokenBatch, pair_teacher_index: torch.Tensor
    ) -> dict[str, float]:
        """One optimizer step of the BT loss over the pairs (teacher row
        ``pair_teacher_index[j]``, student row j); returns ``d_loss``, ``d_acc``,
        ``teacher_score_mean``, ``student_score_mean`` (before the update), ``grad_norm``, ``lr``,
        ``tokens_per_s``."""
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
        start = time.perf_counter()
        both = concat_batches(teacher, student)
        scores = self._score_all(both)
        n = len(teacher)
        ct, cs, metrics = bt_score_grads(scores[:n], scores[n:], idx)
        out = self.run_batch("train_surrogate", both, torch.cat([ct, cs]))[0]
        seconds = time.perf_counter() - start
        return {
            **metrics,
            "grad_norm": out["grad_norm"],
            "lr": out["lr"],
            "tokens_per_s": both.num_tokens() / seconds,
            "step_s": seconds,
        }
