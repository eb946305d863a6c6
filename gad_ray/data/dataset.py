"""Load prompt (+ teacher response) rows from files, HF datasets or the synthetic tasks.

Sources (``DataConfig.train_path`` / ``eval_path``):
- a JSONL file (``.jsonl`` / ``.json``, one object per line; rows are numbered by line, from 1),
- a Parquet file (rows numbered from 0),
- a local HF ``datasets`` directory written by ``save_to_disk`` (a ``DatasetDict`` picks ``split``),
- a hub dataset name, ``datasets.load_dataset(name, split=split)``, tried only when the path is not
  local (local = exists, starts with ``/ . ~``, has a file extension we read, or has 2+ slashes),
- ``synthetic:<split>?n=512&seed=0&min_len=2&max_len=5&tasks=reverse,sort&with_teacher=1``: rows of
  :func:`gad_ray.synthetic.tasks.make_dataset` (``<split>`` only names the source; use different
  seeds for train and eval).

Row formats (recognised per row, see :func:`parse_example`; docs/config.md "Data formats"): TRL's
conversational ``messages`` (the final assistant turn is the teacher response), TRL's
``prompt`` / ``completion`` (strings or message lists), the paper's ``content`` /
``teacher_response`` and a plain ``prompt`` / ``response``; ``data.prompt_key`` /
``data.response_key`` name other columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from gad_ray.config.schema import DataConfig, InputError

ROLES = ("system", "user", "assistant")
SYNTHETIC_PREFIX = "synthetic:"
_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_MAX_REPORTED_ERRORS = 5


class DataError(InputError, ValueError):
    """Unreadable data; the message names the file (or source), row and key."""


@dataclass
class Example:
    """One prompt as chat messages, with its teacher response when the source has one."""

    id: str
    messages: list[dict[str, str]]
    response: str | None
    meta: dict = field(default_factory=dict)
    prompt_key: str = "prompt"  # the row's column the prompt came from


# ---------------------------------------------------------------------------------------------
# sources


def _is_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or Path(path).suffix in _JSONL_SUFFIXES + _PARQUET_SUFFIXES
    )


def _detect_format(path: str) -> str:
    if not _is_local(path):
        return "hub"
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        raise DataError(f"data file {path!r} does not exist")
    if os.path.isdir(local):
        return "hf_disk"
    suffix = Path(local).suffix
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    raise DataError(
        f"data file {path!r}: cannot infer the format from suffix {suffix!r}; use .jsonl, "
        "or .parquet, or set data.format"
    )


def _read_jsonl(path: str, bad_lines: list[str] | None) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}, row {lineno}: invalid JSON ({e.msg} at column {e.colno})"
                if bad_lines is None:
                    raise DataError(msg) from None
                bad_lines.append(msg)


def _read_parquet(path: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"data file {path!r} is not a readable Parquet file: {e}") from e
    index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _read_hf_disk(path: str, split: str) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"directory {path!r} is not a datasets save_to_disk directory: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"dataset directory {path!r} has no split {split!r} (data.split); "
                f"splits: {sorted(ds)}"
            )
        ds = ds[split]
    yield from enumerate(ds)


def _read_hub(name: str, split: str) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, missing split: all end up here
        raise DataError(
            f"data path {name!r} is neither a local file/directory nor a loadable hub dataset "
            f"(split {split!r}): {type(e).__name__}: {e}"
        ) from e
    yield from enumerate(ds)


def _synthetic_rows(spec: str) -> list[dict]:
    from gad_ray.synthetic.tasks import make_dataset

    _, query = spec[len(SYNTHETIC_PREFIX) :].partition("?")[::2]
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(params) - {"n", "seed", "min_len", "max_len", "tasks", "with_teacher"})
    if unknown:
        raise DataError(f"data source {spec!r}: unknown parameter(s) {unknown}")
    if "n" not in params:
        raise DataError(f"data source {spec!r}: missing the number of rows, e.g. '?n=512'")
    try:
        ints = {k: int(params[k]) for k in ("n", "seed", "min_len", "max_len") if k in params}
    except ValueError as e:
        raise DataError(f"data source {spec!r}: {e}") from None
    tasks = params["tasks"].split(",") if params.get("tasks") else None
    with_teacher = params.get("with_teacher", "1").lower() not in ("0", "false", "no")
    try:
        return make_dataset(
            ints["n"],
            ints.get("seed", 0),
            tasks,
            ints.get("min_len", 2),
            ints.get("max_len", 5),
            with_teacher,
        )
    except ValueError as e:
        raise DataError(f"data source {spec!r}: {e}") from None


def load_rows(
    path: str,
    fmt: str = "auto",
    split: str = "train",
    limit: int | None = None,
    bad_lines: list[str] | None = None,
) -> Iterator[tuple[str, int, object]]:
    """Yield ``(source_name, row_index, row)`` for at most ``limit`` rows of ``path``.

    ``fmt`` is one of ``DataConfig.format``. When ``bad_lines`` is a list, JSONL lines that are
    not valid JSON are recorded there (as error messages) and skipped instead of raising.
    """
    if path.startswith(SYNTHETIC_PREFIX):
        rows: Iterator[tuple[int, object]] = enumerate(_synthetic_rows(path))
    else:
        fmt = _detect_format(path) if fmt == "auto" else fmt
        local = os.path.expanduser(path)
        if fmt != "hub" and not os.path.exists(local):
            raise DataError(f"data file {path!r} does not exist")
        if fmt == "jsonl":
            rows = _read_jsonl(local, bad_lines)
        elif fmt == "parquet":
            rows = _read_parquet(local)
        elif fmt == "hf_disk":
            rows = _read_hf_disk(local, split)
        elif fmt == "hub":
            rows = _read_hub(path, split)
        else:
            raise DataError(f"data.format={fmt!r} is not one of auto, jsonl, parquet, hf_disk, hub")
    for n, (index, row) in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield path, index, row


# ---------------------------------------------------------------------------------------------
# rows -> examples


PROMPT_COLUMNS = ("messages", "content", "prompt")  # tried in this order
RESPONSE_COLUMNS = ("teacher_response", "completion", "response")
FORMATS = (
    '{"messages": [{role, content}, ...]} (TRL conversational: a final assistant turn is the '
    "teacher response; without one the row is a prompt only)",
    '{"prompt": ..., "completion": ...} (TRL prompt-completion: each a string or a list of '
    "messages)",
    '{"content": ..., "teacher_response": "..."} (the GAD authors\'; content: a string or '
    "messages)",
    '{"prompt": ..., "response": "..."}',
)


def accepted_formats() -> str:
    """The row formats read without configuration, for error messages."""
    return (
        "accepted row formats: " + "; ".join(FORMATS) + " (or name the columns with "
        "data.prompt_key / data.response_key)"
    )


def _messages(value: object, where: str, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: key {key!r} is an empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(
            f"{where}: key {key!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    if not value:
        raise DataError(f"{where}: key {key!r} is an empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(
                f"{where}: key {key!r}, message {i} must be an object with 'role' and "
                f"'content', got {m!r:.200}"
            )
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(
                f"{where}: key {key!r}, message {i} has unknown role {role!r}; "
                f"expected one of {list(ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where}: key {key!r}, message {i} content must be a string, "
                f"got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    return out


def _check_prompt(messages: list[dict[str, str]], where: str, key: str) -> None:
    if not messages:
        raise DataError(f"{where}: key {key!r} has no prompt before its assistant turn")
    if all(m["role"] == "system" for m in messages):
        raise DataError(f"{where}: key {key!r} has only system messages (no prompt)")


def _response(value: object, where: str, key: str) -> str:
    """A response column: a string, or a list of one assistant message (TRL conversational)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        return value[0]["content"]
    raise DataError(
        f"{where}: key {key!r} must be a string or a list of one assistant message "
        f"{{role: assistant, content}}, got {type(value).__name__} {value!r:.100}"
    )


def parse_example(
    row: object,
    source: str,
    index: int,
    prompt_key: str | None = None,
    response_key: str | None = None,
    system_prompt: str | None = None,
    require_response: bool = True,
) -> Example:
    """Validate one row and turn it into an :class:`Example`; bad rows raise :class:`DataError`.

    The prompt is column ``prompt_key``, else the first of :data:`PROMPT_COLUMNS` the row has
    (not null). The response is column ``response_key``, else the first of
    :data:`RESPONSE_COLUMNS`, else (no response column, no ``response_key``) the prompt's final
    message when the prompt is a message list ending with an assistant turn. A key given is the
    only column read. Other row fields go to ``meta``; ``meta["origin"]`` is
    ``"<source>, row <index>"``.
    """
    where = f"{source}, row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {row!r:.200}; {accepted_formats()}")
    pk = prompt_key or next((k for k in PROMPT_COLUMNS if row.get(k) is not None), None)
    if pk is None or row.get(pk) is None:
        if prompt_key:
            raise DataError(
                f"{where}: missing prompt key {prompt_key!r} (data.prompt_key; null recognises "
                f"the row's format); row keys: {sorted(row)}"
            )
        raise DataError(
            f"{where}: the row fits no accepted format (row keys: {sorted(row)}); "
            f"{accepted_formats()}"
        )
    messages = _messages(row[pk], where, pk)
    rk = response_key or next((k for k in RESPONSE_COLUMNS if row.get(k) is not None), None)
    response = None
    if rk is not None:
        response = None if row.get(rk) is None else _response(row[rk], where, rk)
    elif isinstance(row[pk], list) and messages[-1]["role"] == "assistant":
        response = messages.pop()["content"]  # a conversation: its last turn is the response
    _check_prompt(messages, where, pk)
    if response is None and require_response:
        if response_key:
            raise DataError(
                f"{where}: missing response key {response_key!r} (data.response_key; null "
                f"recognises the row's format); row keys: {sorted(row)}"
            )
        raise DataError(
            f"{where}: no teacher response: no column {' / '.join(RESPONSE_COLUMNS)} and no "
            f"final assistant turn in {pk!r} (row keys: {sorted(row)}); {accepted_formats()}; "
            "for prompts without responses use teacher=api or gad-fetch"
        )
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    row_id = row.get("id")
    meta = {k: v for k, v in row.items() if k not in ("id", pk, rk)}
    meta.setdefault("origin", where)
    return Example(
        id=str(row_id) if row_id is not None else f"{source}:{index}",
        messages=messages,
        response=response,
        meta=meta,
        prompt_key=pk,
    )


def with_response(row: dict, example: Example, text: str, response_key: str | None = None) -> dict:
    """A copy of ``row`` (the row ``example`` was parsed from) with ``text`` as its teacher
    response, in the row's own format: column ``response_key`` when set; else a final assistant
    turn of ``messages``; ``response`` (when the row has that column) or ``completion`` (a list of
    one assistant message when the prompt is a message list) beside ``prompt``;
    ``teacher_response`` beside any other prompt column. :func:`parse_example` reads it back as
    the same prompt with this response."""
    out, pk = dict(row), example.prompt_key
    if response_key:
        out[response_key] = text
    elif pk == "messages":
        out[pk] = [*row[pk], {"role": "assistant", "content": text}]
    elif pk == "prompt" and "response" in row:
        out["response"] = text
    elif pk == "prompt":
        turn = {"role": "assistant", "content": text}
        out["completion"] = text if isinstance(row[pk], str) else [turn]
    else:
        out["teacher_response"] = text
    return out


def load_examples(
    cfg: DataConfig, path: str | None = None, require_response: bool = True
) -> tuple[list[Example], dict]:
    """Parse the rows of ``path`` (default ``cfg.train_path``) into at most ``cfg.limit`` examples.

    With ``cfg.on_bad_row == "skip"`` malformed rows are skipped and counted, else the first one
    raises. Stats: ``rows`` (read), ``examples``, ``skipped_bad_rows``, ``errors`` (first few).
    """
    path = path or cfg.train_path
    skip = cfg.on_bad_row == "skip"
    errors: list[str] = []  # load_rows appends invalid JSON lines here, in file order
    examples: list[Example] = []
    rows = bad_rows = 0
    for source, index, row in load_rows(
        path, cfg.format, cfg.split, None, errors if skip else None
    ):
        if cfg.limit is not None and len(examples) >= cfg.limit:
            break
        rows += 1
        try:
            examples.append(
                parse_example(
                    row,
                    source,
                    index,
                    cfg.prompt_key,
                    cfg.response_key,
                    cfg.system_prompt,
                    require_response,
                )
            )
        except DataError as e:
            if not skip:
                raise
            errors.append(str(e))
            bad_rows += 1
    stats = {
        "rows": rows + len(errors) - bad_rows,
        "examples": len(examples),
        "skipped_bad_rows": len(errors),
        "errors": errors[:_MAX_REPORTED_ERRORS],
    }
    return examples, stats
