"""Seeded synthetic text tasks with a rule-based black-box teacher and an answer checker.

Deterministic tasks (one valid answer) take a length knob (number of words or numbers), so
held-out prompts can be longer than training ones. Multi-modal tasks have several valid answers
with unequal probabilities; the teacher samples among them, the most probable one is known.

An answer is written in a *style* (:data:`STYLES`): ``plain`` is the bare answer, ``framed``
wraps it as ``Answer: <answer>.`` (the style of the testbed's teacher, docs/quality.md); the
others are the formats the testbed's student learnt in pre-training besides the bare answer.
The checker scores the content with any known frame removed, and says whether the response
was in the teacher's frame.
"""

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain", "milk", "book", "door",
    "hat", "cup", "car", "bus", "road", "lake", "hill", "rose", "leaf", "ship", "bell", "coin",
)  # fmt: skip

FRUITS: dict[str, dict[str, float]] = {
    "red": {"apple": 0.6, "cherry": 0.25, "strawberry": 0.15},
    "yellow": {"banana": 0.6, "lemon": 0.3, "pineapple": 0.1},
    "green": {"lime": 0.5, "kiwi": 0.3, "pear": 0.2},
    "orange": {"orange": 0.7, "mango": 0.2, "apricot": 0.1},
    "purple": {"grape": 0.6, "plum": 0.3, "fig": 0.1},
}

SYNONYMS: dict[str, dict[str, float]] = {
    "big": {"large": 0.6, "huge": 0.3, "vast": 0.1},
    "small": {"little": 0.6, "tiny": 0.3, "minor": 0.1},
    "fast": {"quick": 0.6, "rapid": 0.3, "swift": 0.1},
    "happy": {"glad": 0.6, "joyful": 0.3, "cheerful": 0.1},
    "smart": {"clever": 0.6, "bright": 0.3, "wise": 0.1},
}

ANIMALS: dict[str, dict[str, float]] = {
    "fly": {"bird": 0.6, "bat": 0.25, "bee": 0.15},
    "swim": {"fish": 0.6, "duck": 0.3, "frog": 0.1},
    "climb": {"monkey": 0.6, "goat": 0.3, "squirrel": 0.1},
    "hop": {"rabbit": 0.6, "kangaroo": 0.3, "flea": 0.1},
    "dig": {"mole": 0.6, "badger": 0.3, "worm": 0.1},
}

# style name -> (text before the answer, text after it)
STYLES: dict[str, tuple[str, str]] = {
    "plain": ("", ""),
    "framed": ("Answer: ", "."),  # the testbed's teacher (docs/quality.md)
    # the testbed's student's other formats (pre-training only; never the teacher's)
    "result": ("Result: ", ""),
    "sure": ("Sure, ", "."),
    "it_is": ("It is ", "."),
    "here": ("Here: ", ""),
}


@dataclass(frozen=True)
class Task:
    """One task family: a prompt template, a prompt generator and the teacher's answer rule."""

    name: str
    prefix: str  # every prompt of the task starts with this text
    multimodal: bool
    make: Callable[[random.Random, int], str]  # (rng, length) -> prompt
    answers: Callable[[str], dict[str, float]]  # prompt body after the prefix -> answer probs


@dataclass(frozen=True)
class Verdict:
    """Result of checking one response; for deterministic tasks all three flags agree."""

    task: str
    correct: bool
    most_probable: bool
    valid: bool
    framed: bool = False  # the response is exactly STYLES["framed"] around its content


def _words(body: str, task: str) -> list[str]:
    words = body.split()
    if not words:
        raise ValueError(f"{task} prompt has no words after the prefix: {body!r}")
    return words


def _numbers(body: str, task: str) -> list[int]:
    tokens = _words(body, task)
    if not all(t.isdigit() for t in tokens):
        raise ValueError(f"{task} prompt must list non-negative integers, got {body!r}")
    return [int(t) for t in tokens]


def _choice_answers(table: dict[str, dict[str, float]], task: str) -> Callable[[str], dict]:
    def answers(body: str) -> dict[str, float]:
        key = body.strip().removesuffix(".")
        if key not in table:
            raise ValueError(f"{task} prompt asks about {key!r}; known: {sorted(table)}")
        return table[key]

    return answers


def _word_task(name: str, prefix: str, rule: Callable[[list[str]], list[str]]) -> Task:
    return Task(
        name=name,
        prefix=prefix,
        multimodal=False,
        make=lambda rng, length: prefix + " ".join(rng.choice(WORDS) for _ in range(length)),
        answers=lambda body: {" ".join(rule(_words(body, name))): 1.0},
    )


def _number_task(name: str, prefix: str, hi: int, rule: Callable[[list[int]], str]) -> Task:
    return Task(
        name=name,
        prefix=prefix,
        multimodal=False,
        make=lambda rng, length: prefix + " ".join(str(rng.randint(0, hi)) for _ in range(length)),
        answers=lambda body: {rule(_numbers(body, name)): 1.0},
    )


def _choice_task(name: str, prefix: str, table: dict[str, dict[str, float]]) -> Task:
    keys = sorted(table)
    return Task(
        name=name,
        prefix=prefix,
        multimodal=True,
        make=lambda rng, length: f"{prefix}{rng.choice(keys)}.",  # length is ignored
        answers=_choice_answers(table, name),
    )


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _word_task("copy", "Copy the words: ", lambda w: w),
        _word_task("upper", "Uppercase the words: ", lambda w: [x.upper() for x in w]),
        _word_task("reverse", "Reverse the words: ", lambda w: w[::-1]),
        _number_task("sort", "Sort the numbers: ", 99, lambda n: " ".join(map(str, sorted(n)))),
        _number_task("add", "Add the numbers: ", 9, lambda n: str(sum(n))),
        _choice_task("fruit", "Name a fruit that is ", FRUITS),
        _choice_task("synonym", "Give a synonym of ", SYNONYMS),
        _word_task("last", "Give the last word: ", lambda w: w[-1:]),
        _word_task("count", "Count the words: ", lambda w: [str(len(w))]),
        _choice_task("animal", "Name an animal that can ", ANIMALS),
    )
}


def find_task(prompt: str) -> Task:
    """The task whose template the prompt follows; ValueError if none does."""
    text = prompt.strip()
    for task in TASKS.values():
        if text.startswith(task.prefix):
            return task
    raise ValueError(f"no synthetic task recognises the prompt {prompt[:200]!r}")


def answer_distribution(prompt: str) -> tuple[str, dict[str, float]]:
    """(task name, {valid answer: teacher probability}) for a prompt."""
    task = find_task(prompt)
    return task.name, task.answers(prompt.strip()[len(task.prefix) :])


def most_probable_answer(prompt: str) -> str:
    """The teacher's single most probable answer (its greedy answer)."""
    _, dist = answer_distribution(prompt)
    return max(dist, key=dist.__getitem__)


def make_prompt(task: str, rng: random.Random, length: int) -> str:
    """A random prompt of `task` with `length` words/numbers (ignored by multi-modal tasks)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return TASKS[task].make(rng, length)


def styled(answer: str, style: str) -> str:
    """``answer`` written in ``style`` (a key of STYLES)."""
    if style not in STYLES:
        raise ValueError(f"unknown answer style {style!r}; known: {sorted(STYLES)}")
    before, after = STYLES[style]
    return f"{before}{answer}{after}"


def unframe(response: str) -> tuple[str, str]:
    """(content, style): the whitespace-normalised response with a known frame removed.

    A response that starts with a style's opening has it removed, and the closing too when
    present; ``style`` names it only when both are there (``Answer: cat.`` is ``framed``), else
    it is ``"partial"``; with no opening the response is ``plain`` content as it stands
    (``cat.`` keeps its period and is not a valid answer)."""
    text = " ".join(response.split())
    for name, (before, after) in STYLES.items():
        if not before or not text.startswith(before.strip()):
            continue
        body = text[len(before.strip()) :].strip()
        if body.endswith(after):
            return (body[: len(body) - len(after)].strip() if after else body), name
        return body, "partial"
    return text, "plain"


def teacher_answer(
    prompt: str,
    rng: random.Random | None = None,
    temperature: float = 1.0,
    style: str = "plain",
) -> str:
    """The teacher's answer in ``style``: sampled from p**(1/T) with `rng`, greedy if T == 0 or
    rng is None."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    _, dist = answer_distribution(prompt)
    if rng is None or temperature == 0 or len(dist) == 1:
        return styled(max(dist, key=dist.__getitem__), style)
    answers = list(dist)
    weights = [dist[a] ** (1.0 / temperature) for a in answers]
    return styled(rng.choices(answers, weights=weights)[0], style)


def check(prompt: str, response: str) -> Verdict:
    """Check a response against the prompt's task: its content (whitespace-normalised, a known
    frame removed, exact otherwise) and whether it is in the teacher's frame."""
    name, dist = answer_distribution(prompt)
    answer, style = unframe(response)
    valid = answer in dist
    best = max(dist, key=dist.__getitem__)
    return Verdict(name, valid, answer == best, valid, style == "framed")


def prompt_text(prompt: str | Sequence[dict]) -> str:
    """The prompt string of a plain prompt or of chat messages (their last user message)."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError(f"messages have no user message: {list(prompt)!r}")
    return users[-1]["content"]


def score_responses(prompts: Sequence[str | Sequence[dict]], responses: Sequence[str]) -> dict:
    """Accuracy and framed share overall and per task; multi-modal tasks also get most_probable /
    valid_minor / invalid shares. Prompts are strings or chat message lists."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    per: dict[str, list[Verdict]] = {}
    for p, r in zip(prompts, responses, strict=True):
        v = check(prompt_text(p), r)
        per.setdefault(v.task, []).append(v)
    tasks = {}
    for name, vs in sorted(per.items()):
        n = len(vs)
        row: dict[str, float | int] = {"n": n, "accuracy": sum(v.correct for v in vs) / n}
        row["framed"] = sum(v.framed for v in vs) / n
        if TASKS[name].multimodal:
            row["most_probable"] = sum(v.most_probable for v in vs) / n
            row["valid_minor"] = sum(v.valid and not v.most_probable for v in vs) / n
            row["invalid"] = sum(not v.valid for v in vs) / n
        tasks[name] = row
    total = sum(len(vs) for vs in per.values())
    correct = sum(v.correct for vs in per.values() for v in vs)
    framed = sum(v.framed for vs in per.values() for v in vs)
    overall = {"n": total, "accuracy": correct / total if total else 0.0}
    overall["framed"] = framed / total if total else 0.0
    return {"overall": overall, "tasks": tasks}


def make_dataset(
    n: int,
    seed: int,
    tasks: Sequence[str] | None = None,
    min_len: int = 2,
    max_len: int = 5,
    with_teacher: bool = True,
    style: str = "plain",
) -> list[dict]:
    """`n` rows {id, task, content: [user message], teacher_response (sampled at T=1, in
    ``style``)}."""
    names = sorted(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown tasks {unknown or names!r}; known: {sorted(TASKS)}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len} max_len={max_len}")
    styled("", style)  # an unknown style fails before any row is made
    prompt_rng = random.Random(f"prompts-{seed}")
    answer_rng = random.Random(f"answers-{seed}")
    rows = []
    for i in range(n):
        task = prompt_rng.choice(names)
        prompt = make_prompt(task, prompt_rng, prompt_rng.randint(min_len, max_len))
        row = {"id": f"syn-{seed}-{i:06d}", "task": task}
        row["content"] = [{"role": "user", "content": prompt}]
        if with_teacher:
            row["teacher_response"] = teacher_answer(prompt, answer_rng, style=style)
        rows.append(row)
    return rows


def write_dataset(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL, or as Parquet when the path ends with .parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write a synthetic dataset file."""
    ap = argparse.ArgumentParser(description="Write a synthetic GAD dataset (JSONL or Parquet).")
    ap.add_argument("--out", required=True, help="output file (.jsonl or .parquet)")
    ap.add_argument("--n", type=int, required=True, help="number of rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-len", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=5)
    ap.add_argument("--tasks", default=None, help=f"comma-separated subset of {sorted(TASKS)}")
    ap.add_argument("--no-teacher", action="store_true", help="omit teacher_response")
    ap.add_argument("--style", default="plain", choices=sorted(STYLES), help="teacher's style")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    try:
        rows = make_dataset(
            args.n, args.seed, tasks, args.min_len, args.max_len, not args.no_teacher, args.style
        )
    except ValueError as e:
        ap.error(str(e))
    path = write_dataset(args.out, rows)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
