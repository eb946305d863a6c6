"""LLM-as-a-judge, MT-Bench single-answer grading, reference-guided (docs/algorithms.md §5.2).

The judge (any OpenAI-compatible model, temperature 0) sees the question, a reference answer
and the assistant's answer, reasons, and ends with ``Rating: [[N]]``, N in 1..10. The *last*
``[[N]]`` of the reply is the score; a reply without one (or with N outside 1..10) is
unparseable: counted and reported, never guessed. Requests go through the teacher
:class:`~gad_ray.teacher.fetcher.Fetcher`, so retries, rate limits and the durable cache apply
and a rerun pays for nothing twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gad_ray.config.schema import JudgeConfig, TeacherAPIConfig

# The marker lines the synthetic judge (gad_ray.synthetic.server) recognises.
QUESTION_MARK = "[Question]"
REF_START, REF_END = "[The Start of Reference Answer]", "[The End of Reference Answer]"
ANS_START, ANS_END = "[The Start of Assistant's Answer]", "[The End of Assistant's Answer]"

DEFAULT_TEMPLATE = (
    "[Instruction]\n"
    "Please act as an impartial judge and evaluate the quality of the response provided by an "
    "AI assistant to the user question displayed below. Your evaluation should consider "
    "correctness and helpfulness. You will be given a reference answer and the assistant's "
    "answer. Begin your evaluation by comparing the assistant's answer with the reference "
    "answer; identify and correct any mistakes. Be as objective as possible. After providing "
    "your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
    'this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
    f"{QUESTION_MARK}\n{{question}}\n\n"
    f"{REF_START}\n{{reference}}\n{REF_END}\n\n"
    f"{ANS_START}\n{{answer}}\n{ANS_END}"
)
FIELDS = ("{question}", "{reference}", "{answer}")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


class JudgeError(ValueError):
    """A judge config that cannot work (missing endpoint, a template without its fields)."""


@dataclass
class Verdict:
    """One judged response: the score (None when unparseable or the request failed)."""

    score: float | None
    status: str  # "ok" | "unparseable" | "failed"
    reply: str | None
    error: str | None = None


def template_of(cfg: JudgeConfig) -> str:
    """The configured template (checked to hold all three fields) or the default."""
    template = cfg.template or DEFAULT_TEMPLATE
    missing = [f for f in FIELDS if f not in template]
    if missing:
        raise JudgeError(f"eval.judge.template lacks the field(s) {missing}; it needs {FIELDS}")
    return template


def judge_prompt(template: str, question: str, reference: str, answer: str) -> str:
    """Fill the template (plain replacement, so braces in the texts are safe)."""
    return (
        template.replace("{question}", question)
        .replace("{reference}", reference)
        .replace("{answer}", answer)
    )


def parse_rating(reply: str | None) -> float | None:
    """The last ``[[N]]`` of the reply as a float in [1, 10], else None."""
    found = _RATING.findall(reply or "")
    if not found:
        return None
    score = float(found[-1])
    return score if 1.0 <= score <= 10.0 else None


def judge_api(cfg: JudgeConfig, cache_path: str) -> TeacherAPIConfig:
    """The fetcher config of the judge endpoint."""
    if not cfg.base_url or not cfg.model:
        raise JudgeError("eval.judge.base_url and eval.judge.model must both be set")
    return TeacherAPIConfig(
        base_url=cfg.base_url,
        model=cfg.model,
        api_key_env=cfg.api_key_env,
        system_prompt=cfg.system_prompt,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        concurrency=cfg.concurrency,
        requests_per_minute=cfg.requests_per_minute,
        max_retries=cfg.max_retries,
        timeout_s=cfg.timeout_s,
        cache_path=cache_path,
    )


def verdict(status: str, text: str | None, error: str | None) -> Verdict:
    """A fetch result (status, text, error) -> :class:`Verdict`."""
    if status != "ok":
        return Verdict(None, "failed", text, error)
    score = parse_rating(text)
    return Verdict(score, "ok" if score is not None else "unparseable", text)
