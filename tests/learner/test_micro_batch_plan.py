"""The micro-batches the learners compute on the 7B preset's step (experiment=qwen2.5-7b_gpt5chat:
256 prompts x 8 samples over 8 ranks, 12288 tokens per micro-batch) with LMSYS-like lengths:
the budget bounds the tokens computed, and padding stays small (docs/placement.md).

Measured on the plan :meth:`LearnerGroup.plan` returns (a group object without actors: the plan
is computed on the host), each micro-batch built as the worker builds it: padded, the rows
selected and trimmed to the longest (``TokenBatch.select``, rows x longest row); packed, the one
row of ``gad_ray.learner.packing.micro_batch``. An empty micro-batch computes a dummy row."""

import math

import pytest
import torch

from gad_ray.data.batch import TokenBatch, concat_batches, make_batch
from gad_ray.hydra_app import compose
from gad_ray.learner.group import LearnerGroup

PRESET = "experiment=qwen2.5-7b_gpt5chat"


def lognormal_lengths(n: int, median: float, sigma: float, cap: int, gen: torch.Generator):
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=gen, dtype=torch.float64))
    return x.round().clamp(1, cap).long().tolist()


def lmsys_like_step(cfg, role: str, seed: int = 0) -> TokenBatch:
    """One step's rows: prompts log-normal around 80 tokens (sigma 1.0), responses around 450
    (sigma 0.6), capped at the preset's max prompt / response lengths. G trains on the
    ``n_samples`` student samples of each prompt; D on the teacher rows, then the student rows."""
    gen = torch.Generator().manual_seed(seed)
    d, n = cfg.data, cfg.algorithm.grpo.n_samples
    prompts = lognormal_lengths(d.prompts_per_step, 80, 1.0, d.max_prompt_length, gen)
    student = lognormal_lengths(len(prompts) * n, 450, 0.6, d.max_response_length, gen)
    rows = make_batch(
        [[5] * prompts[i // n] for i in range(len(student))], [[7] * r for r in student], 0
    )
    if role == "generator":
        return rows
    teacher = lognormal_lengths(len(prompts), 450, 0.6, d.max_response_length, gen)
    return concat_batches(
        make_batch([[5] * p for p in prompts], [[7] * r for r in teacher], 0), rows
    )


def plan_of(cfg, role: str, batch: TokenBatch, packing: bool) -> list[list[list[int]]]:
    group = object.__new__(LearnerGroup)  # the host side only: no actors
    group.cfg, group.packing = cfg, packing
    group.num_ranks = getattr(cfg.learner, f"{role}_ranks")
    return group.plan(batch)


def measure(batch: TokenBatch, plan, computed) -> dict:
    """Tokens computed / real over the step, the worst micro-batch, the largest, per-rank count."""
    total = real = 0
    worst, largest = 1.0, 0
    for rank in plan:
        for idx in rank:
            c = computed(idx or [0])  # an empty micro-batch runs row 0 as a dummy
            r = batch.select(idx).num_tokens() if idx else 0
            total, real, largest = total + c, real + r, max(largest, c)
            worst = max(worst, c / r) if r else worst
    return {"ratio": total / real, "worst": worst, "largest": largest, "per_rank": len(plan[0])}


@pytest.mark.parametrize("role", ["generator", "discriminator"])
def test_padded_micro_batches_compute_at_most_15_percent_padding(role):
    cfg = compose([PRESET])
    budget = cfg.learner.max_tokens_per_micro_batch
    assert budget == 12288 and getattr(cfg.learner, f"{role}_ranks") == 8
    batch = lmsys_like_step(cfg, role)
    plan = plan_of(cfg, role, batch, packing=False)
    m = measure(batch, plan, lambda rows: batch.select(rows).input_ids.numel())
    print(
        f"\n{role} padded: {len(batch)} rows, {m['per_rank']} micro-batches per rank, computed/"
        f"real {m['ratio']:.3f}, worst micro-batch {m['worst']:.3f}, largest {m['largest']} tokens"
    )
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(len(batch)))
    assert m["largest"] <= budget  # the budget bounds what is computed
    assert m["ratio"] <= 1.15


@pytest.mark.parametrize("role", ["generator", "discriminator"])
def test_packed_micro_batches_compute_no_padding(role):
    from gad_ray.learner.packing import micro_batch

    cfg = compose([PRESET])
    batch = lmsys_like_step(cfg, role)
    plan = plan_of(cfg, role, batch, packing=True)
    cpu = torch.device("cpu")
    m = measure(batch, plan, lambda rows: micro_batch(batch, rows, cpu, True).computed_tokens())
    print(
        f"\n{role} packed: {m['per_rank']} micro-batches per rank, computed/real "
        f"{m['ratio']:.3f}, largest {m['largest']} tokens"
    )
    assert m["largest"] <= cfg.learner.max_tokens_per_micro_batch
    assert m["ratio"] == 1.0
