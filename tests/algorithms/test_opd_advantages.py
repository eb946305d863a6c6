"""On-policy distillation's per-token advantage (docs/algorithms.md §7) against hand values."""

import math

import pytest
import torch

from gad_ray.algorithms.advantages import opd_advantages


def test_per_token_advantage_by_hand():
    # row 0: prompt token, then 2 response tokens, then padding; row 1: 3 response tokens
    teacher = torch.log(torch.tensor([[1.0, 0.5, 0.25, 1.0], [1.0, 0.1, 0.9, 0.5]]))
    student = torch.log(torch.tensor([[1.0, 0.25, 0.5, 1.0], [1.0, 0.1, 0.3, 0.125]]))
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    adv = opd_advantages(teacher, student, mask)
    ln2, ln3 = math.log(2.0), math.log(3.0)
    expected = torch.tensor([[0.0, ln2, -ln2, 0.0], [0.0, 0.0, ln3, 2 * ln2]])
    torch.testing.assert_close(adv, expected)


def test_minus_its_expectation_under_the_student_is_the_reverse_kl():
    # one position, vocabulary of 3: sum_y G(y) * (-A(y)) = KL(G || T) = sum_y G log(G / T)
    g = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    adv = opd_advantages(t.log()[:, None], g.log()[:, None], torch.ones(3, 1))
    kl = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3)
    assert float(-(g * adv[:, 0]).sum()) == pytest.approx(kl, rel=1e-12)


def test_detached_and_zero_off_the_response():
    teacher = torch.zeros(1, 3, requires_grad=True)
    student = torch.full((1, 3), -1.0, requires_grad=True)
    adv = opd_advantages(teacher, student, torch.tensor([[0.0, 1.0, 0.0]]))
    assert not adv.requires_grad
    assert adv.tolist() == [[0.0, 1.0, 0.0]]


def test_a_non_finite_response_token_is_an_error_naming_it():
    teacher = torch.tensor([[-math.inf, -1.0, -math.inf]])  # -inf on the prompt is fine
    student = torch.tensor([[0.0, -1.0, -2.0]])
    with pytest.raises(ValueError, match="row 0, token 2 is not finite"):
        opd_advantages(teacher, student, torch.tensor([[0, 1, 1]]))
    adv = opd_advantages(teacher, student, torch.tensor([[0, 1, 0]]))
    assert adv.tolist() == [[0.0, 0.0, 0.0]]


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"both be \[B, T\]"):
        opd_advantages(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        opd_advantages(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
