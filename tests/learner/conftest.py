"""Shared fixtures of the learner tests: batches, and a single-process reference trainer (plain
HF model + torch AdamW + the same loss functions); configs come from tests/config_builder.py."""

import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from gad_ray.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    ppo_clip_loss,
    sft_loss_mat,
    token_logprobs,
)
from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, make_batch
from tests.config_builder import learner_config


def make_token_batch(seed: int = 0, n: int = 6, vocab: int = 2000, pad_id: int = 0) -> TokenBatch:
    """Rows of random prompt (3-9 tokens) and response (2-12 tokens) ids of varied lengths."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 9))] for _ in range(n)]
    responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))] for _ in range(n)]
    return make_batch(prompts, responses, pad_id)


def ref_logprobs(
    model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy of ``softmax(logits / temperature)``, aligned with the tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = F.pad(token_logprobs(logits, batch.input_ids[:, 1:], temperature), (1, 0))
    return logp, F.pad(entropy_from_logits(logits, temperature), (1, 0))


class ReferenceTrainer:
    """The same steps as the learner group, in one process on the whole batch."""

    def __init__(self, model_dir: Path, cfg: Config) -> None:
        torch.manual_seed(0)
        self.cfg = cfg
        load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
        self.model, self.ref = load(), load().requires_grad_(False)
        o = cfg.algorithm.generator_optim
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )

    def _step(self, loss: torch.Tensor) -> float:
        loss.backward()
        clip = self.cfg.algorithm.generator_optim.grad_clip or math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.opt.step()
        self.opt.zero_grad()
        return norm

    def sft(self, batch: TokenBatch) -> dict[str, float]:
        logp, _ = ref_logprobs(self.model, batch)
        loss = aggregate_loss(sft_loss_mat(logp), batch.response_mask, "token-mean")
        return {"loss": loss.item(), "grad_norm": self._step(loss)}

    def grpo(
        self, batch: TokenBatch, adv: torch.Tensor, old: torch.Tensor | None, temperature: float
    ) -> dict:
        """The step on samples drawn at ``temperature`` (its log-probs are at it)."""
        g, mask = self.cfg.algorithm.grpo, batch.response_mask
        logp, ent = ref_logprobs(self.model, batch, temperature)  # the sampling distribution
        old = logp.detach() if old is None else old
        pg_mat, stats = ppo_clip_loss(logp, old, adv, mask, g.clip_low, g.clip_high, g.dual_clip)
        pg = aggregate_loss(pg_mat, mask, g.loss_agg_mode)
        with torch.no_grad():
            ref, _ = ref_logprobs(self.ref, batch, temperature)
        kl = aggregate_loss(kl_penalty(logp, ref, g.kl_estimator), mask, g.loss_agg_mode)
        loss = pg + g.kl_coef * kl
        n = float(mask.sum())
        out = {
            "loss": loss.item(),
            "pg_loss": pg.item(),
            "kl": kl.item(),
            "pg_clipfrac": float(stats["clipped"].sum()) / n,
            "approx_kl": float(stats["approx_kl"].sum()) / n,
            "entropy": float((ent.detach() * mask).sum()) / n,
        }
        out["grad_norm"] = self._step(loss)
        return out

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}


def assert_metrics_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    for k, v in want.items():
        if k in ("tokens_per_s", "step_s", "pad_ratio"):  # timings; padding depends on the split
            continue
        assert got[k] == pytest.approx(v, rel=tol, abs=tol), f"metric {k}: {got[k]} != {v}"


def assert_params_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=f"parameter {k}")


@pytest.fixture(scope="session")
def lh() -> SimpleNamespace:
    """The helpers above and the learner config builder, for test modules (conftest is not
    importable as a module)."""
    return SimpleNamespace(
        learner_config=learner_config,
        make_token_batch=make_token_batch,
        ref_logprobs=ref_logprobs,
        ReferenceTrainer=ReferenceTrainer,
        assert_metrics_close=assert_metrics_close,
        assert_params_close=assert_params_close,
    )
