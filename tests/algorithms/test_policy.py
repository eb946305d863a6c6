import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gad_ray.algorithms import (
    AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    loss_denominator,
    ppo_clip_loss,
    token_logprobs,
)

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, float("nan"), float("inf")]])


def test_loss_denominator_by_hand():
    assert loss_denominator(MASK, "token-mean") == 5.0
    assert loss_denominator(MASK.bool(), "token-mean") == 5.0
    assert loss_denominator(MASK, "seq-mean-token-mean") == 2.0
    assert loss_denominator(MASK, "seq-mean-token-sum-norm") == 8.0  # 2 sequences * T=4
    assert loss_denominator(MASK, "seq-mean-token-sum-norm", norm_len=10) == 20.0
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'sum'"):
        loss_denominator(MASK, "sum")
    with pytest.raises(ValueError, match="norm_len must be positive, got 0"):
        loss_denominator(MASK, "seq-mean-token-sum-norm", norm_len=0)


def test_aggregate_loss_by_hand():
    # token-mean: (1+2+3+4+6)/5; seq-mean-token-mean: (6/3 + 10/2)/2; sum-norm: 16/(2*4)
    assert aggregate_loss(LOSS, MASK, "token-mean").item() == pytest.approx(3.2)
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx(3.5)
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(2.0)
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", 20.0).item() == pytest.approx(0.8)
    # a micro-batch (first row) under the global token-mean denominator 5: 6/5
    assert aggregate_loss(LOSS[:1], MASK[:1], "token-mean", 5.0).item() == pytest.approx(1.2)


def test_aggregate_loss_all_padding_is_zero_and_errors():
    empty = torch.zeros(2, 3)
    for mode in AGG_MODES:
        assert aggregate_loss(torch.ones(2, 3), empty, mode).item() == 0.0
    with pytest.raises(
        ValueError, match=r"loss_mat has shape \(2, 3\) but mask has shape \(2, 4\)"
    ):
        aggregate_loss(torch.ones(2, 3), MASK, "token-mean")
    with pytest.raises(ValueError, match="global_denominator must be >= 0"):
        aggregate_loss(LOSS, MASK, "token-mean", -1.0)


def _ppo(ratio: float, adv: float, **kw):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = ppo_clip_loss(
        logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), **kw
    )
    return loss.item(), {k: v.item() for k, v in stats.items()}


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "clipped"),
    [
        (1.5, 1.0, -1.2, 1.0),  # A>0, ratio above 1+eps: clipped to 1.2
        (0.5, 1.0, -0.5, 0.0),  # A>0, ratio below 1-eps: unclipped (pessimistic)
        (1.5, -1.0, 1.5, 0.0),  # A<0, ratio above: unclipped
        (0.5, -1.0, 0.8, 1.0),  # A<0, ratio below 1-eps: clipped to 0.8
        (1.1, 2.0, -2.2, 0.0),  # inside the range
        (4.0, -1.0, 4.0, 0.0),  # A<0, large ratio, no dual clip
    ],
)
def test_ppo_clip_cases(ratio, adv, loss, clipped):
    got, stats = _ppo(ratio, adv)
    assert got == pytest.approx(loss, rel=1e-6)
    assert stats["clipped"] == clipped
    assert stats["dual_clipped"] == 0.0
    assert stats["ratio"] == pytest.approx(ratio, rel=1e-6)
    assert stats["approx_kl"] == pytest.approx(-math.log(ratio), rel=1e-6)


def test_ppo_dual_clip_and_asymmetric_clip():
    got, stats = _ppo(4.0, -1.0, dual_clip=3.0)  # min(4, 3*1)
    assert got == pytest.approx(3.0) and stats["dual_clipped"] == 1.0
    got, stats = _ppo(2.0, -1.0, dual_clip=3.0)  # 2 < 3: not engaged
    assert got == pytest.approx(2.0) and stats["dual_clipped"] == 0.0
    got, stats = _ppo(4.0, 2.0, dual_clip=3.0)  # A>0: only the normal clip, -2*1.2
    assert got == pytest.approx(-2.4) and stats["dual_clipped"] == 0.0
    got, _ = _ppo(1.5, 1.0, clip_high=0.28)
    assert got == pytest.approx(-1.28)
    got, _ = _ppo(0.5, -1.0, clip_low=0.1)
    assert got == pytest.approx(0.9)
    with pytest.raises(ValueError, match="dual_clip must be > 1.0, got 0.5"):
        _ppo(1.0, 1.0, dual_clip=0.5)


def test_ppo_gradient_mask_and_detached_inputs():
    logp = torch.zeros(1, 3, requires_grad=True)
    old = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[2.0, -3.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss_mat, stats = ppo_clip_loss(logp, old, adv, mask)
    torch.testing.assert_close(loss_mat, torch.tensor([[-2.0, 3.0, 0.0]]))
    aggregate_loss(loss_mat, mask, "token-mean").backward()
    # at ratio 1: dl/dlogp = -A, token-mean over 2 tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 1.5, 0.0]]))
    assert old.grad is None and adv.grad is None
    assert stats["ratio"].tolist() == [[1.0, 1.0, 0.0]]


def test_kl_penalty_by_hand():
    logp = torch.tensor([0.0, -1.0])
    ref = torch.tensor([-1.0, 0.0])  # logp - ref = [1, -1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5]))
    # exp(-1) - (-1) - 1 = e^-1; exp(1) - 1 - 1 = e - 2
    k3 = torch.tensor([0.36787944117144233, 0.7182818284590451])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), k3)
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), k3)
    # clamp: exp(20) - 20 - 1 -> 10
    clamped = kl_penalty(torch.tensor([-20.0]), torch.tensor([0.0]), "low_var_kl")
    assert clamped.item() == 10.0
    with pytest.raises(ValueError, match="unknown KL kind 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_kl_penalty_gradient_only_through_logp():
    logp = torch.tensor([0.5], requires_grad=True)
    ref = torch.tensor([0.0], requires_grad=True)
    kl_penalty(logp, ref, "k3").sum().backward()
    # d/dlogp [exp(ref - logp) + (logp - ref) - 1] = 1 - exp(-0.5)
    assert logp.grad.item() == pytest.approx(1 - math.exp(-0.5))
    assert ref.grad is None


def test_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]]])
    ent = entropy_from_logits(logits)
    # uniform over 4: ln 4; p = [1/4, 3/4]: 0.5623351446188083
    torch.testing.assert_close(ent, torch.tensor([[math.log(4.0), 0.5623351446188083]]))
    hot = entropy_from_logits(torch.tensor([[[0.0, 2 * math.log(3.0), -1e4, -1e4]]]), 2.0)
    assert hot.item() == pytest.approx(0.5623351446188083, rel=1e-5)


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    got = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(got, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    # temperature 2 on [0, 2 ln 3] is [0, ln 3]
    got = token_logprobs(2 * logits, torch.tensor([[1, 0]]), temperature=2.0)
    torch.testing.assert_close(got, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    assert token_logprobs(logits.bfloat16(), torch.tensor([[1, 0]])).dtype == torch.float32


def test_token_logprobs_chunks_match_log_softmax_with_grad():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    got = token_logprobs(logits, labels, temperature=0.7, chunk_size=4)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    ent = entropy_from_logits(logits, chunk_size=4)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))


def test_token_logprobs_errors():
    logits = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got min -100"):
        token_logprobs(logits, torch.tensor([[1, -100]]))
    with pytest.raises(ValueError, match=r"labels \(1, 3\) do not match logits \(1, 2, 5\)"):
        token_logprobs(logits, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature must be positive"):
        token_logprobs(logits, torch.zeros(1, 2, dtype=torch.int64), temperature=0.0)


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 8),
    length=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    cuts=st.lists(st.integers(1, 7), max_size=4),
    mode=st.sampled_from(AGG_MODES),
)
def test_microbatch_split_matches_full_batch(batch, length, seed, cuts, mode):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < 0.7

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        return v.square() * 0.5 - v.sin()  # nonlinear so the gradient depends on v

    full_x = x.clone().requires_grad_()
    full = aggregate_loss(loss_of(full_x), mask, mode)
    full.backward()

    den = loss_denominator(mask, mode, norm_len=length)
    bounds = [0, *sorted({c for c in cuts if c < batch}), batch]
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    split_x = x.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for lo, hi in spans:
        m = mask[lo:hi]
        width = int(m.any(0).nonzero().max()) + 1 if m.any() else 1  # re-padded micro-batch
        total = total + aggregate_loss(loss_of(split_x[lo:hi, :width]), m[:, :width], mode, den)
    total.backward()

    torch.testing.assert_close(total, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(split_x.grad, full_x.grad, rtol=0, atol=1e-6)
    assert sum(loss_denominator(mask[lo:hi], mode, length) for lo, hi in spans) == den
