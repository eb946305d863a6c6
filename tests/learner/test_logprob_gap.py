"""G's GRPO update measures ``logprob_gap``: the mean |current policy's log-prob - the rollout's|
over the response tokens, summed over micro-batches and ranks; the rollout's log-probs only
measure, they never become PPO's old log-probs (the on-policy ratio stays 1)."""

import pytest
import torch

from gad_ray.learner import GeneratorGroup

T = 0.8  # the samples' temperature (learner_config's algorithm.grpo.temperature too)


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir, lh):
    cfg = lh.learner_config(tiny_model_dir, generator_ranks=2, max_tokens_per_micro_batch=24)
    g = GeneratorGroup(cfg)
    yield g
    g.shutdown()


def test_gap_is_the_mean_absolute_difference_and_the_ratio_stays_one(group, lh):
    batch = lh.make_token_batch(seed=1, n=6)
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    noise = 0.3 * torch.randn(batch.input_ids.shape, generator=gen) * mask
    adv = torch.randn(len(batch), generator=gen)
    assert len(group.plan(batch)[0]) >= 2  # several micro-batches per rank: sums, all-reduce

    exact = group.compute_logprobs(batch, T)  # a rollout that computes what the learner does
    m = group.train_grpo(batch, adv, rollout_logprobs=exact, temperature=T)
    assert m["logprob_gap"] == pytest.approx(0, abs=1e-6)

    rollout = group.compute_logprobs(batch, T) + noise  # a rollout that is off by `noise`
    m = group.train_grpo(batch, adv, rollout_logprobs=rollout, temperature=T)
    assert m["logprob_gap"] == pytest.approx(float(noise.abs().sum() / mask.sum()), abs=1e-5)
    assert m["pg_clipfrac"] == 0 and m["approx_kl"] == pytest.approx(0, abs=1e-7)

    assert "logprob_gap" not in group.train_grpo(
        batch, adv, temperature=T
    )  # nothing to compare with


def test_misshapen_rollout_logprobs_are_rejected(group, lh):
    batch = lh.make_token_batch(seed=1, n=6)
    with pytest.raises(ValueError, match=r"train_grpo: rollout_logprobs has shape \(6, 3\)"):
        group.train_grpo(batch, torch.zeros(6), rollout_logprobs=torch.zeros(6, 3), temperature=T)


def test_the_update_computes_at_the_samples_temperature_not_the_config_key(group, lh):
    """Samples drawn at 0.5 (the config says 0.8): the update's log-probs equal a rollout's at
    0.5 (gap 0, ratio 1 against them as old log-probs); at the config's 0.8 they would not."""
    batch = lh.make_token_batch(seed=2, n=6)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
    assert group.cfg.algorithm.grpo.temperature == T != 0.5
    drawn_at = group.compute_logprobs(batch, 0.5)
    m = group.train_grpo(batch, adv, drawn_at, drawn_at, temperature=0.5)
    assert m["logprob_gap"] == pytest.approx(0, abs=1e-6)
    assert m["approx_kl"] == pytest.approx(0, abs=1e-7) and m["pg_clipfrac"] == 0
    drawn_at = group.compute_logprobs(batch, 0.5)  # after the update
    assert (
        group.train_grpo(batch, adv, rollout_logprobs=drawn_at, temperature=T)["logprob_gap"] > 1e-2
    )
    with pytest.raises(ValueError, match=r"train_grpo: temperature must be > 0 .* got 0"):
        group.train_grpo(batch, adv, temperature=0.0)
