"""A few of each eval's generations, to read beside the numbers: the prompt, the student's
response, the teacher's, and D's score of both when a discriminator is alive. The driver logs
them with the eval event (metrics.jsonl, TensorBoard text, a W&B table; ``trainer.log_samples``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # metrics.py imports this module: kept light
    from gad_ray.data.tokenize import TokenizedExample
    from gad_ray.rollout.types import Sample

COLUMNS = ("prompt", "student", "teacher", "d_student", "d_teacher")


def eval_samples(
    examples: list[TokenizedExample],
    samples: list[Sample],
    tokenizer: Any,
    k: int,
    discriminator: Any | None = None,
) -> list[dict[str, Any]]:
    """Rows of :data:`COLUMNS` for the first ``k`` eval prompts (the same prompts at every
    eval, so the rows of two evals compare). ``samples`` are the eval's generations (one per
    prompt); ``discriminator`` (its group, when alive) scores the student's and the teacher's
    response (None where a response is empty or the set has no teacher response)."""
    chosen = sorted(samples, key=lambda s: s.prompt_index)[:k]
    rows = []
    for s in chosen:
        e = examples[s.prompt_index]
        rows.append(
            {
                "prompt": _prompt_text(e.messages),
                "student": tokenizer.decode(s.token_ids, skip_special_tokens=True),
                "teacher": e.response,
                "d_student": None,
                "d_teacher": None,
            }
        )
    if discriminator is None or not rows:
        return rows
    from gad_ray.data.batch import make_batch

    pad = tokenizer.pad_token_id
    for column, responses in (
        ("d_student", [s.token_ids for s in chosen]),
        ("d_teacher", [examples[s.prompt_index].response_ids or [] for s in chosen]),
    ):
        scored = [i for i, r in enumerate(responses) if r]
        if not scored:
            continue
        prompts = [examples[chosen[i].prompt_index].prompt_ids for i in scored]
        values = discriminator.score(make_batch(prompts, [responses[i] for i in scored], pad))
        for i, v in zip(scored, values.tolist(), strict=True):
            rows[i][column] = v
    return rows


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (TensorBoard's text panel renders it)."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row[c]) for c in COLUMNS]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _prompt_text(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", "<br>")
