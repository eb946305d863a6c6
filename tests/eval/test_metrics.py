import math

import pytest

from gad_ray.eval.metrics import (
    lcs_length,
    length_stats,
    mean_ci,
    ngram_f1,
    rouge_l,
    t_quantile,
    words,
)


def test_words_lowercase_and_drop_punctuation() -> None:
    assert words("The CAT, the dog!") == ["the", "cat", "the", "dog"]


def test_ngram_f1_clips_counts_and_uses_n() -> None:
    assert ngram_f1("the cat sat", "the cat sat") == 1.0
    # unigrams: overlap {the: 1} of 3 predicted, 1 reference -> P 1/3, R 1
    assert ngram_f1("the the the", "the") == pytest.approx(0.5)
    # bigrams of "a b c" vs "a b d": overlap (a b) -> P = R = 1/2
    assert ngram_f1("a b c", "a b d", n=2) == pytest.approx(0.5)
    assert ngram_f1("x", "y") == 0.0 and ngram_f1("", "") == 1.0 and ngram_f1("a", "") == 0.0


def test_rouge_l_is_lcs_f1() -> None:
    assert lcs_length("a b c d".split(), "a c e d".split()) == 3
    assert rouge_l("a b c d", "a c e d") == pytest.approx(0.75)
    # LCS "a c" (2): P = 2/2, R = 2/4 -> F1 = 2/3; order matters, unlike unigram F1
    assert rouge_l("a c", "c x a c") == pytest.approx(2 / 3)
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    assert ngram_f1("d c b a", "a b c d") == 1.0


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062), (2, 4.3027), (5, 2.5706), (30, 2.0423), (1000, 1.9623)]
)
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_mean_ci() -> None:
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.1824 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n)
    assert mean == 2.5 and low == pytest.approx(2.5 - half, abs=1e-3)
    assert high == pytest.approx(2.5 + half, abs=1e-3)
    assert mean_ci([7.0]) == (7.0, 7.0, 7.0)
    assert mean_ci([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
    assert all(math.isnan(x) for x in mean_ci([]))


def test_length_stats() -> None:
    assert length_stats([3, 1, 2, 10]) == {"mean": 4.0, "median": 2.5, "max": 10.0}
    assert length_stats([5]) == {"mean": 5.0, "median": 5.0, "max": 5.0}
