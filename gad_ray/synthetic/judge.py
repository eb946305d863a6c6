"""The judge the synthetic teacher server plays (``gad-eval``'s judge prompts, gad_ray/eval/judge.py):
deterministic, so the eval's judged scores can be checked exactly."""

from __future__ import annotations

import math

from gad_ray.eval.judge import ANS_END, ANS_START, QUESTION_MARK, REF_END, REF_START
from gad_ray.eval.metrics import ngram_f1
from gad_ray.synthetic.tasks import check, most_probable_answer

NO_RATING_MARKER = "[no rating]"  # a judged question holding this gets a reply with no rating


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    j = text.rfind(end)
    if i < 0 or j < i + len(start):
        return None
    return text[i + len(start) : j].strip()


def judge_rating(question: str, reference: str | None, answer: str) -> tuple[int, str]:
    """(rating, reason): for a synthetic task 10 = the most probable answer, 7 = another valid
    one; otherwise (or for a question no task knows, against the reference) 10 for an exact
    match, else 1 + floor(4 x word F1 with the expected answer)."""
    try:
        verdict = check(question, answer)
        expected = most_probable_answer(question)
    except ValueError:
        verdict, expected = None, " ".join((reference or "").split())
    if verdict is not None and verdict.most_probable:
        return 10, "It is the most probable correct answer."
    if verdict is not None and verdict.valid:
        return 7, "It is a correct but less common answer."
    if verdict is None and " ".join(answer.split()) == expected:
        return 10, "It matches the reference answer."
    return 1 + math.floor(4 * ngram_f1(answer, expected)), "It is wrong."


def judge_reply(prompt: str) -> str | None:
    """The deterministic judge's reply to a judge prompt (None when ``prompt`` is not one): some
    reasoning, then ``Rating: [[N]]``; no rating at all when the question holds NO_RATING_MARKER."""
    question = _between(prompt, QUESTION_MARK, REF_START) or _between(
        prompt, QUESTION_MARK, ANS_START
    )
    answer = _between(prompt, ANS_START, ANS_END)
    if question is None or answer is None:
        return None
    reference = _between(prompt, REF_START, REF_END)
    if NO_RATING_MARKER in question:
        return "I cannot judge this answer; I will not give it a rating."
    rating, reason = judge_rating(question, reference, answer)
    return f"The assistant answered {answer!r}. {reason} Rating: [[{rating}]]"
