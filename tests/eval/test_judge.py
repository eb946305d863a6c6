import pytest

from gad_ray.config.schema import JudgeConfig
from gad_ray.eval.judge import (
    DEFAULT_TEMPLATE,
    JudgeError,
    judge_api,
    judge_prompt,
    parse_rating,
    template_of,
    verdict,
)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Good answer. Rating: [[8]]", 8.0),
        ("An answer like [[2]] would be bad; this one is fine. Rating: [[9]]", 9.0),  # the last
        ("Rating: [[ 7.5 ]]", 7.5),
        ("Rating: [[10]]", 10.0),
        ("Rating: [[0]]", None),  # off the 1..10 scale
        ("Rating: [[11]]", None),
        ("Rating: [8]", None),  # no double brackets: not guessed
        ("I would give it an 8.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rating_takes_the_last_double_bracket(reply: str | None, score: float | None) -> None:
    assert parse_rating(reply) == score


def test_verdict_statuses() -> None:
    assert verdict("ok", "Rating: [[3]]", None).score == 3.0
    v = verdict("ok", "no idea", None)
    assert (v.score, v.status, v.reply) == (None, "unparseable", "no idea")
    v = verdict("failed", None, "HTTP 500")
    assert (v.score, v.status, v.error) == (None, "failed", "HTTP 500")


def test_template_fields_and_prompt() -> None:
    prompt = judge_prompt(DEFAULT_TEMPLATE, "Q {x}", "R", "A {answer}")
    assert "[Question]\nQ {x}\n\n[The Start of Reference Answer]\nR\n" in prompt
    assert (
        "[The Start of Assistant's Answer]\nA {answer}\n[The End of Assistant's Answer]" in prompt
    )
    assert "Rating: [[5]]" in prompt
    assert template_of(JudgeConfig()) == DEFAULT_TEMPLATE
    with pytest.raises(JudgeError, match=r"lacks the field\(s\) \['\{reference\}'\]"):
        template_of(JudgeConfig(template="{question} {answer}"))


def test_judge_api_needs_an_endpoint_and_keeps_temperature_zero() -> None:
    with pytest.raises(JudgeError, match="eval.judge.base_url and eval.judge.model"):
        judge_api(JudgeConfig(model="gpt-4o"), "c.sqlite")
    api = judge_api(JudgeConfig(base_url="http://x/v1", model="gpt-4o"), "c.sqlite")
    assert api.temperature == 0.0 and api.cache_path == "c.sqlite" and api.model == "gpt-4o"
