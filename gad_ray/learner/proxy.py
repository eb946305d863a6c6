"""The Proxy-KD proxy learner (docs/algorithms.md §4): SFT and iterative DPO on teacher
responses, then the top-k targets the student distils from.

The proxy is a generator learner in the student's place: :func:`proxy_view` gives the generator
code a config whose ``model.student``, ``algorithm.generator_optim`` and
``learner.generator_ranks`` are the proxy's, so SFT, log-probs, the frozen reference
(``reset_reference``: the previous DPO iteration's proxy), checkpoints, export and weight sync
are the generator's.

A DPO pair's loss is nonlinear in both of its sequences' mean log-probs, so a DPO step is the
exact two-pass surrogate step of :meth:`~gad_ray.learner.group.LearnerGroup.surrogate_step`
over one combined batch (chosen rows, then rejected rows); each row's values are its mean token
log-prob under the proxy (differentiable) and under the reference (a constant).
"""

from __future__ import annotations

import torch

from gad_ray.algorithms import dpo_loss, seq_mean_logp
from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, concat_batches
from gad_ray.learner.generator import GeneratorGroup, GeneratorWorker, _check_batch
from gad_ray.learner.packing import MicroBatch, policy_logprobs, topk_targets
from gad_ray.models.loading import check_same_tokenizer, load_tokenizer
from gad_ray.placement import RolePlacement


def proxy_view(cfg: Config) -> Config:
    """A copy of ``cfg`` with the proxy in the student's place (model spec, optimizer, ranks)."""
    pk = cfg.algorithm.proxy_kd
    if pk.proxy is None:
        raise ValueError("algorithm.proxy_kd.proxy is not set: Proxy-KD needs a proxy model")
    view = cfg.model_copy(deep=True)
    view.model.student = pk.proxy.model_copy()
    view.algorithm.generator_optim = pk.proxy_optim.model_copy()
    view.learner.generator_ranks = pk.ranks
    return view


def check_proxy_tokenizer(cfg: Config) -> None:
    """Raise :class:`ModelLoadError` when the proxy's tokenizer differs from the student's: the
    student distils the proxy's distribution over its own vocabulary."""
    student, proxy = cfg.model.student, cfg.algorithm.proxy_kd.proxy
    check_same_tokenizer(
        load_tokenizer(student.tokenizer or student.path),
        load_tokenizer(proxy.tokenizer or proxy.path),
        f"student (model.student.path={student.path!r})",
        f"proxy (algorithm.proxy_kd.proxy.path={proxy.path!r})",
    )


class ProxyWorker(GeneratorWorker):
    """One rank of the proxy learner (its ``cfg`` is a :func:`proxy_view`)."""

    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def row_values(self, mb: MicroBatch) -> torch.Tensor:
        """Per row: [mean token log-prob under the proxy, under the frozen reference]."""
        if self.reference is None:
            raise RuntimeError("train_dpo: this proxy learner was built without a reference")
        pol = seq_mean_logp(policy_logprobs(self.engine.module, mb)[0], mb.response_mask)
        with torch.no_grad():
            ref = seq_mean_logp(policy_logprobs(self.reference, mb)[0], mb.response_mask)
        return torch.stack([pol, ref.to(pol.dtype)], dim=-1)

    @torch.no_grad()
    def topk(
        self, batch: TokenBatch, plan: list[list[int]], k: int
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(row, top-k log-probs [t, k], top-k ids [t, k], token log-probs [t]) per row."""
        self.engine.module.eval()
        out = []
        for idx, _, mb in self.micro_batches(batch, plan):
            top_logp, top_ids, logp = topk_targets(self.engine.module, mb, k)
            for j, i in enumerate(idx):
                out.append((i, top_logp[j].cpu(), top_ids[j].cpu(), logp[j].cpu()))
        return out


class ProxyGroup(GeneratorGroup):
    """``algorithm.proxy_kd.ranks`` actors training the proxy; the generator's methods
    (``train_sft``, ``compute_logprobs``, ``reset_reference``, ``sync_weights``, checkpoints,
    ``save_pretrained``) apply to the proxy."""

    worker_cls = ProxyWorker
    role = "proxy"

    def __init__(
        self,
        cfg: Config,
        model_path: str | None = None,
        total_steps: int | None = None,
        with_reference: bool = True,
        cpus_per_rank: float = 1,
        placement: RolePlacement | None = None,
    ) -> None:
        """``model_path`` defaults to ``algorithm.proxy_kd.proxy.path``; ``with_reference``
        (the frozen DPO reference) is needed for ``train_dpo`` only. The proxy's tokenizer
        must be the student's (checked here, before any actor starts)."""
        view = proxy_view(cfg)
        check_proxy_tokenizer(cfg)
        super().__init__(
            view,
            model_path or view.model.student.path,
            total_steps,
            with_reference,
            cpus_per_rank,
            placement,
        )

    def train_dpo(self, chosen: TokenBatch, rejected: TokenBatch) -> dict[str, float]:
        """One optimizer step of DPO + SFT on the chosen response (docs/algorithms.md §4.3) over the pairs
        (``chosen`` row i, ``rejected`` row i), against the frozen reference.

        Returns ``dpo_loss``'s metrics (``dpo_loss``, ``sft_loss``, ``chosen_reward``,
        ``rejected_reward``, ``reward_margin``, ``reward_accuracy``, all before the update),
        ``loss``, ``chosen_logp`` / ``rejected_logp`` (mean over pairs of the per-token mean
        log-prob), ``grad_norm``, ``lr``, ``tokens_per_s`` and ``step_s``.
        """
        method = "ProxyGroup.train_dpo"
        _check_batch(chosen, method)
        _check_batch(rejected, method)
        if len(chosen) != len(rejected):
            raise ValueError(
                f"{method}: {len(chosen)} chosen rows but {len(rejected)} rejected rows; "
                "each chosen row pairs with the rejected row of the same index"
            )
        pk, p = self.cfg.algorithm.proxy_kd, len(chosen)

        def loss(values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            x, ref = values[:, 0], values[:, 1]
            out, metrics = dpo_loss(
                x[:p], x[p:], ref[:p], ref[p:], pk.dpo_beta, pk.dpo_sft_weight, "mean"
            )
            metrics |= {
                "loss": out.item(),
                "chosen_logp": x[:p].mean().item(),
                "rejected_logp": x[p:].mean().item(),
            }
            return out, metrics

        return self.surrogate_step(concat_batches(chosen, rejected), loss)

    def topk(self, batch: TokenBatch, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's distillation targets from one proxy forward: ``(top_logp, top_ids,
        logprobs)``. ``top_logp``/``top_ids`` [B, T, k]: the proxy's top-k token ids at each
        position and their log-probs renormalised over those k (``proxy_topk``) for the
        distribution token t is drawn from (aligned with ``input_ids``; zero at t=0 and on
        padding); ``logprobs`` [B, T]: its log-probs of the batch's tokens, zero off the
        response (``seq_mean_logp`` of them gives the sample weights' confidence ``s``)."""
        _check_batch(batch, "ProxyGroup.topk")
        vocab = self.run("vocab_size")
        if not 0 < k <= vocab:
            raise ValueError(
                f"algorithm.proxy_kd.top_k={k} must be in [1, {vocab}] (the proxy's vocabulary)"
            )
        b, t = batch.input_ids.shape
        top_logp = torch.zeros(b, t, k)
        top_ids = torch.zeros(b, t, k, dtype=torch.long)
        logprobs = torch.zeros(b, t)
        for rows in self.run_batch("topk", batch, k):
            for i, lp, ids, logp in rows:
                n = lp.shape[0]
                top_logp[i, :n], top_ids[i, :n], logprobs[i, :n] = lp, ids, logp
        keep = batch.response_mask[..., None]
        return top_logp * keep, top_ids * keep.long(), logprobs * batch.response_mask
