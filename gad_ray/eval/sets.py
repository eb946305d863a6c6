"""Eval sets: the paper's four as presets of their public schemas, any JSONL / Parquet / HF set.

A preset names where each field lives in a row; keys are dotted paths (``instances.0.output``),
and a tuple lists alternatives tried in order (Vicuna's ``text`` or ``turns.0``):

| preset     | prompt                                 | reference               | teacher            |
|------------|----------------------------------------|-------------------------|--------------------|
| `lmsys`    | `content` (string or messages)         | `teacher_response`      | `teacher_response` |
| `dolly`    | `instruction` + `context`              | `response`              | -                  |
| `selfinst` | `instruction` + `instances.0.input`    | `instances.0.output`    | -                  |
| `vicuna`   | `text` or `turns.0` (`category`)       | - (the judge answers)   | -                  |

With no preset and no ``prompt_key`` / ``input_key`` each row's format is recognised as in training
(:func:`gad_ray.data.dataset.parse_example`: TRL ``messages`` or ``prompt`` / ``completion``, the
paper's ``content`` / ``teacher_response``, ``prompt`` / ``response``); its response is the
reference and the teacher answer unless ``reference_key`` / ``teacher_key`` name others. A set with
no reference key is graded against a reference the judge writes first (``reference: judge``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gad_ray.config.schema import EvalSetSpec
from gad_ray.data.dataset import DataError, accepted_formats, load_rows, parse_example

_MISSING = object()

PRESETS: dict[str, dict] = {
    "lmsys": {
        "prompt_key": ("content",),
        "reference_key": "teacher_response",
        "teacher_key": "teacher_response",
    },
    "dolly": {
        "prompt_key": ("instruction",),
        "input_key": "context",
        "reference_key": "response",
        "category_key": "category",
    },
    "selfinst": {
        "prompt_key": ("instruction",),
        "input_key": "instances.0.input",
        "reference_key": "instances.0.output",
    },
    "vicuna": {"prompt_key": ("text", "turns.0"), "category_key": "category", "reference": "judge"},
}


@dataclass
class EvalItem:
    """One eval prompt: chat messages, its question text (for the judge) and optional answers."""

    id: str
    messages: list[dict[str, str]]
    question: str
    reference: str | None
    teacher: str | None
    category: str | None
    origin: str


@dataclass
class EvalSet:
    name: str
    path: str
    reference: str  # "set" | "judge"
    items: list[EvalItem] = field(default_factory=list)

    @property
    def has_teacher(self) -> bool:
        return bool(self.items) and all(it.teacher is not None for it in self.items)


def resolve_keys(spec: EvalSetSpec, default_reference: str) -> dict:
    """The row keys of ``spec``: its own where set, else its preset's; with neither a preset nor
    a prompt or input key, ``auto``: the row formats of training (reference: the response)."""
    if spec.preset is None and spec.prompt_key is None and spec.input_key is None:
        keys = {k: getattr(spec, k) for k in ("reference_key", "teacher_key", "category_key")}
        return {**keys, "auto": True, "reference": spec.reference or default_reference}
    keys = dict(PRESETS[spec.preset or "lmsys"])
    keys.setdefault("reference", None)
    for k in ("input_key", "reference_key", "teacher_key", "category_key"):
        keys.setdefault(k, None)
    for k in ("input_key", "reference_key", "teacher_key", "category_key", "reference"):
        if getattr(spec, k) is not None:
            keys[k] = getattr(spec, k)
    if spec.prompt_key is not None:
        keys["prompt_key"] = (spec.prompt_key,)
    keys["reference"] = keys["reference"] or default_reference
    if keys["reference"] == "set" and keys["reference_key"] is None:
        keys["reference"] = "judge"  # nothing to grade against in the set
    return keys


def get_path(row: dict, key: str) -> object:
    """``row[key]`` for a dotted path (list indices are numbers); a missing step -> _MISSING."""
    value: object = row
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _text(row: dict, key: str | None, where: str, required: bool) -> str | None:
    if key is None:
        return None
    value = get_path(row, key)
    if value is _MISSING or value is None:
        if required:
            raise DataError(f"{where}: missing key {key!r}; row keys: {sorted(row)}")
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{where}: key {key!r} must be a string, got {type(value).__name__} {value!r:.100}"
        )
    return value


def parse_item(row: object, source: str, index: int, keys: dict) -> EvalItem:
    """One row -> :class:`EvalItem`; a bad row raises :class:`DataError` naming file, row, key."""
    where = f"{source}, row {index}"
    if keys.get("auto"):
        return _parse_auto(row, source, index, keys)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {row!r:.200}")
    found = [k for k in keys["prompt_key"] if get_path(row, k) not in (_MISSING, None)]
    if not found:
        raise DataError(
            f"{where}: missing prompt key {' or '.join(map(repr, keys['prompt_key']))}; "
            f"row keys: {sorted(row)}"
        )
    prompt = get_path(row, found[0])
    extra = _text(row, keys["input_key"], where, required=False)
    if extra and extra.strip():
        if not isinstance(prompt, str):
            raise DataError(f"{where}: key {found[0]!r} must be a string to append an input")
        prompt = f"{prompt}\n\n{extra}"
    example = parse_example(
        {"id": row.get("id"), "prompt": prompt}, source, index, "prompt", "response",
        require_response=False,
    )  # fmt: skip
    need_reference = keys["reference"] == "set"
    category = get_path(row, keys["category_key"]) if keys["category_key"] else None
    return EvalItem(
        id=example.id,
        messages=example.messages,
        question="\n\n".join(m["content"] for m in example.messages if m["role"] == "user"),
        reference=_text(row, keys["reference_key"], where, required=need_reference),
        teacher=_text(row, keys["teacher_key"], where, required=False),
        category=None if category in (_MISSING, None) else str(category),
        origin=where,
    )


def _parse_auto(row: object, source: str, index: int, keys: dict) -> EvalItem:
    """A row in any format of :func:`parse_example`; its response is the reference and teacher."""
    where = f"{source}, row {index}"
    example = parse_example(row, source, index, require_response=False)
    reference = example.response
    if keys["reference_key"] is not None:
        reference = _text(row, keys["reference_key"], where, required=False)
    if reference is None and keys["reference"] == "set":
        raise DataError(
            f"{where}: no reference answer (the set is graded against its own answers, "
            f"eval.judge.reference=set); {accepted_formats()}; or set the set's reference_key, "
            "preset, or reference: judge"
        )
    teacher = example.response
    if keys["teacher_key"] is not None:
        teacher = _text(row, keys["teacher_key"], where, required=False)
    category = get_path(row, keys["category_key"]) if keys["category_key"] else None
    return EvalItem(
        id=example.id,
        messages=example.messages,
        question="\n\n".join(m["content"] for m in example.messages if m["role"] == "user"),
        reference=reference,
        teacher=teacher,
        category=None if category in (_MISSING, None) else str(category),
        origin=where,
    )


def set_name(spec: EvalSetSpec) -> str:
    return spec.name or spec.preset or Path(spec.path.split("?")[0]).stem or spec.path


def load_set(spec: EvalSetSpec, default_reference: str = "set") -> EvalSet:
    """Read and validate every row of ``spec`` (at most ``spec.limit``); the first bad row raises."""
    keys = resolve_keys(spec, default_reference)
    out = EvalSet(set_name(spec), spec.path, keys["reference"])
    for source, index, row in load_rows(spec.path, spec.format, spec.split, spec.limit):
        out.items.append(parse_item(row, source, index, keys))
    if not out.items:
        raise DataError(f"eval set {out.name!r} ({spec.path}) has no rows")
    return out
