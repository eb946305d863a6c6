import math

import pytest
import torch

from gad_ray.algorithms import (
    aggregate_loss,
    bt_loss,
    dpo_loss,
    proxy_kd_loss,
    proxy_kd_loss_topk,
    proxy_sample_weights,
    proxy_topk,
    seq_mean_logp,
    sft_loss_mat,
    topk_kl,
    topk_kl_from_targets,
)

LN3 = math.log(3.0)


def test_sft_loss_is_token_mean_nll():
    logp = torch.tensor([[-0.5, -2.0, -9.0], [-1.5, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(sft_loss_mat(logp)[0], torch.tensor([0.5, 2.0, 9.0]))
    assert aggregate_loss(sft_loss_mat(logp), mask, "token-mean").item() == pytest.approx(4 / 3)


def test_seq_mean_logp_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -50.0], [-4.0, -50.0, -50.0, -50.0], [-5.0] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(seq_mean_logp(logp, mask), torch.tensor([-2.0, -4.0, 0.0]))


def test_bt_loss_by_hand_with_tie():
    teacher = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    student = torch.tensor([0.0, 0.0, 3.0], requires_grad=True)
    loss, metrics = bt_loss(teacher, student)
    # -logsigmoid(1), -logsigmoid(0), -logsigmoid(-1) = 0.313262, 0.693147, 1.313262
    assert loss.item() == pytest.approx(0.7732235185321303, rel=1e-6)
    assert metrics["d_loss"] == pytest.approx(0.7732235185321303, rel=1e-6)
    assert metrics["d_acc"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["teacher_score_mean"] == pytest.approx(1.0)
    assert metrics["student_score_mean"] == pytest.approx(1.0)
    loss.backward()
    # d/dt -logsigmoid(t - s) = -sigmoid(s - t), divided by the 3 pairs
    sig = torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(teacher.grad, -sig / 3)
    torch.testing.assert_close(student.grad, sig / 3)


def test_bt_loss_sum_for_global_pair_count():
    teacher, student = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    total, _ = bt_loss(teacher, student, reduction="sum")
    assert total.item() == pytest.approx(2.319670555596391, rel=1e-6)
    part_a, _ = bt_loss(teacher[:1], student[:1], reduction="sum")
    part_b, _ = bt_loss(teacher[1:], student[1:], reduction="sum")
    assert (part_a + part_b).item() / 3 == pytest.approx(bt_loss(teacher, student)[0].item())
    with pytest.raises(ValueError, match="equal length"):
        bt_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        bt_loss(teacher, student, reduction="max")


def test_dpo_loss_by_hand():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0], requires_grad=True)
    rr = torch.tensor([-1.0, -2.0])
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 1: c = 0.05, r = -0.1, -logsigmoid(0.15) = 0.620957, + 1 (sft on pc = -1)
    # pair 2: c = 0.0,  r = 0.1,  -logsigmoid(-0.1) = 0.744397, + 2
    assert loss.item() == pytest.approx(2.1826768539315515, rel=1e-6)
    assert metrics["dpo_loss"] == pytest.approx(0.6826768539315515, rel=1e-6)
    assert metrics["sft_loss"] == pytest.approx(1.5)
    assert metrics["chosen_reward"] == pytest.approx(0.025)
    assert metrics["rejected_reward"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["reward_margin"] == pytest.approx(0.025)
    assert metrics["reward_accuracy"] == pytest.approx(0.5)
    only_dpo, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, sft_weight=0.0)
    assert only_dpo.item() == pytest.approx(0.6826768539315515, rel=1e-6)
    summed, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, reduction="sum")
    assert summed.item() == pytest.approx(2 * 2.1826768539315515, rel=1e-6)
    loss.backward()
    assert rc.grad is None  # the reference is a constant
    # dl/dpc = -beta * sigmoid(-margin) - 1, halved by the mean over 2 pairs
    expected = (-0.1 * torch.sigmoid(torch.tensor([-0.15, 0.1])) - 1.0) / 2
    torch.testing.assert_close(pc.grad, expected)


def test_proxy_sample_weights_by_hand():
    w = proxy_sample_weights(torch.tensor([-1.0, -2.0, -3.0], requires_grad=True))
    # mean -2, unbiased std 1: sigmoid([1, 0, -1] / 0.4) = sigmoid([2.5, 0, -2.5])
    torch.testing.assert_close(w, torch.tensor([0.9241418199787566, 0.5, 0.07585818002124355]))
    assert not w.requires_grad
    torch.testing.assert_close(proxy_sample_weights(torch.full((4,), -0.7)), torch.full((4,), 0.5))
    torch.testing.assert_close(proxy_sample_weights(torch.tensor([-1.3])), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="temp must be positive"):
        proxy_sample_weights(torch.zeros(2), temp=0.0)


def test_topk_kl_by_hand_student_not_renormalised():
    proxy = torch.tensor([[[LN3, 0.0, -5.0, -6.0], [LN3, 0.0, -5.0, -6.0]]])
    student = torch.zeros(1, 2, 4, requires_grad=True)  # uniform: q = 1/4
    mask = torch.tensor([[1.0, 0.0]])
    kl = topk_kl(proxy, student, mask, k=2)
    # p_top2 = [3/4, 1/4]: 0.75 ln(0.75/0.25) + 0.25 ln(0.25/0.25) = 0.75 ln 3
    # (a renormalised student would give 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308)
    torch.testing.assert_close(kl, torch.tensor([[0.8239592165010823, 0.0]]))
    assert topk_kl(proxy, student, mask, k=1)[0, 0].item() == pytest.approx(math.log(4.0))
    kl.sum().backward()
    assert student.grad[0, 0].abs().sum() > 0 and student.grad[0, 1].abs().sum() == 0
    same = torch.randn(2, 3, 5, dtype=torch.float64)
    zero = torch.zeros(2, 3, dtype=torch.float64)
    torch.testing.assert_close(topk_kl(same, same, torch.ones(2, 3), k=5), zero)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\], got 5"):
        topk_kl(proxy, student, mask, k=5)
    with pytest.raises(ValueError, match="same shape"):
        topk_kl(proxy, torch.zeros(1, 2, 3), mask)


def test_proxy_kd_loss_by_hand_and_microbatched():
    proxy = torch.tensor([LN3, 0.0, -5.0, -6.0]).expand(2, 2, 4).clone()
    proxy[0, 1] = 0.0  # ties: top-2 is [1/2, 1/2] -> KL vs uniform = ln 2
    student = torch.zeros(2, 2, 4, requires_grad=True)  # CE = ln 4 per token
    labels = torch.tensor([[0, 3], [2, 1]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights = torch.tensor([0.75, 0.25])
    loss, metrics = proxy_kd_loss(student, proxy, labels, mask, weights, alpha=2.0, k=2)
    # kd = (0.75 * (0.75 ln 3 + ln 2) / 2 + 0.25 * 0.75 ln 3) / 2 = 0.387452
    assert metrics["ce"] == pytest.approx(math.log(4.0), rel=1e-6)
    assert metrics["kd"] == pytest.approx(0.387452351511578, rel=1e-6)
    assert metrics["weight_mean"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(2.1611990641430463, rel=1e-6)
    total = 0.0
    for i in range(2):  # one sequence per micro-batch, global denominators: 3 tokens, 2 seqs
        one = slice(i, i + 1)
        part, _ = proxy_kd_loss(
            student[one],
            proxy[one],
            labels[one],
            mask[one],
            weights[one],
            alpha=2.0,
            k=2,
            token_denominator=3.0,
            seq_denominator=2.0,
        )
        total += part.item()
    assert total == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"weights \(3,\) must be \[B\]"):
        proxy_kd_loss(student, proxy, labels, mask, torch.ones(3))


def test_proxy_topk_targets_by_hand_and_equal_to_the_full_logits_path():
    proxy = torch.tensor([[[LN3, 0.0, -5.0, -6.0], [0.0, -6.0, LN3, -5.0]]], dtype=torch.bfloat16)
    log_p, ids = proxy_topk(proxy, 2)
    assert log_p.dtype == torch.float32 and ids.tolist() == [[[0, 1], [2, 0]]]
    # bf16 ln 3 = 1.1015625: p = [e^x, e^0] / (e^x + 1), renormalised over the 2 ids
    p0 = math.exp(1.1015625) / (math.exp(1.1015625) + 1.0)
    torch.testing.assert_close(log_p.exp()[0, 0], torch.tensor([p0, 1.0 - p0]))
    gen = torch.Generator().manual_seed(0)
    proxy, student = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    mask = (torch.rand(3, 5, generator=gen) > 0.3).float()
    targets = proxy_topk(proxy, 3)
    kl = topk_kl_from_targets(*targets, student, mask, chunk_size=4)
    torch.testing.assert_close(kl, topk_kl(proxy, student, mask, k=3))
    labels, weights = torch.randint(0, 7, (3, 5), generator=gen), torch.rand(3, generator=gen)
    a = proxy_kd_loss(student, proxy, labels, mask, weights, alpha=2.0, k=3)
    b = proxy_kd_loss_topk(student, *targets, labels, mask, weights, alpha=2.0)
    torch.testing.assert_close(a[0], b[0])
    assert a[1] == b[1]
    with pytest.raises(ValueError, match=r"k must be in \[1, 7\], got 8"):
        proxy_topk(proxy, 8)
    with pytest.raises(ValueError, match=r"must be \[B, T, k\]"):
        topk_kl_from_targets(targets[0][:2], targets[1], student, mask)
