import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gad_ray.algorithms import broadcast_to_tokens, grpo_advantages

EPS = 1e-6


def test_single_group_by_hand():
    adv = grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0]))
    # mean 2, unbiased std 1
    expected = torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + EPS)
    torch.testing.assert_close(adv, expected)


def test_interleaved_unequal_groups_by_hand():
    rewards = torch.tensor([1.0, 10.0, 3.0, 20.0, 5.0], dtype=torch.float64)
    groups = torch.tensor([7, 3, 7, 3, 7])
    adv = grpo_advantages(rewards, groups)
    # group 7: [1, 3, 5], mean 3, std 2; group 3: [10, 20], mean 15, std sqrt(50)
    s50 = math.sqrt(50.0)
    expected = torch.tensor(
        [-2 / (2 + EPS), -5 / (s50 + EPS), 0.0, 5 / (s50 + EPS), 2 / (2 + EPS)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float64


def test_no_std_normalisation_only_centres():
    rewards = torch.tensor([1.0, 10.0, 3.0, 20.0, 5.0])
    groups = torch.tensor([7, 3, 7, 3, 7])
    adv = grpo_advantages(rewards, groups, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -5.0, 0.0, 5.0, 2.0]))


@pytest.mark.parametrize("norm", [True, False])
def test_group_of_one_gets_zero(norm):
    adv = grpo_advantages(torch.tensor([4.0, 1.0, 2.0]), torch.tensor([0, 1, 1]), norm_by_std=norm)
    # group 1: [1, 2], mean 1.5, std sqrt(0.5)
    half = 0.5 / (math.sqrt(0.5) + EPS) if norm else 0.5
    torch.testing.assert_close(adv, torch.tensor([0.0, -half, half]))


def test_equal_rewards_give_zero():
    adv = grpo_advantages(torch.tensor([0.3, 0.3, 0.3, 0.3]), torch.tensor([5, 5, 5, 5]))
    torch.testing.assert_close(adv, torch.zeros(4), atol=1e-5, rtol=0)


def test_advantages_are_detached():
    rewards = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not grpo_advantages(rewards, torch.tensor([0, 0])).requires_grad


def test_bad_input_errors():
    with pytest.raises(ValueError, match="same length"):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="index 1 is not finite: nan"):
        grpo_advantages(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]))


def test_broadcast_to_tokens_by_hand():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"adv \(3,\)"):
        broadcast_to_tokens(torch.zeros(3), mask)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
    norm=st.booleans(),
)
def test_zero_mean_and_unit_std_per_group(sizes, seed, norm):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.repeat_interleave(torch.arange(len(sizes)) * 11, torch.tensor(sizes))
    groups = groups[torch.randperm(len(groups), generator=gen)]
    rewards = torch.randn(len(groups), generator=gen, dtype=torch.float64) * 3
    adv = grpo_advantages(rewards, groups, norm_by_std=norm)
    for g in groups.unique():
        a = adv[groups == g]
        assert abs(float(a.mean())) < 1e-9
        r = rewards[groups == g]
        expected_std = float(r.std() / (r.std() + EPS)) if norm else float(r.std())
        assert float(a.std()) == pytest.approx(expected_std, rel=1e-9)
