"""The row formats read with no key mapping (docs/config.md "Data formats"): TRL's conversational
``messages`` and prompt-completion rows, the authors' ``content`` / ``teacher_response``, and
``prompt`` / ``response``; explicit keys win; a row in no format names the formats."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gad_ray.config.schema import DataConfig
from gad_ray.data.dataset import (
    FORMATS,
    DataError,
    load_examples,
    parse_example,
    with_response,
)

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write(path, rows, schema: pa.Schema | None = None) -> str:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(path: str, require_response: bool = True, **kw):
    return load_examples(DataConfig(train_path=path, **kw), require_response=require_response)[0]


CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4")]},
    {"messages": [user("Hi"), assistant("Hello!"), user("Name a color."), assistant("Red.")]},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_trl_conversational_messages(tmp_path, suffix):
    schema = pa.schema([("messages", MESSAGES)])
    path = write(tmp_path / f"conv{suffix}", CONVERSATIONS, schema)
    examples = load(path)
    assert [e.messages for e in examples] == [
        [{"role": "system", "content": "Be brief."}, user("2+2?")],
        [user("Hi"), assistant("Hello!"), user("Name a color.")],  # earlier turns stay
    ]
    assert [e.response for e in examples] == ["4", "Red."]
    assert all("messages" not in e.meta for e in examples)


def test_prompt_only_messages_row_is_a_prompt_for_teacher_api(tmp_path):
    rows = [{"messages": [user("Hi")]}, {"messages": [user("a"), assistant("b"), user("c")]}]
    path = write(tmp_path / "p.jsonl", rows)
    examples = load(path, require_response=False)
    assert [e.messages for e in examples] == [rows[0]["messages"], rows[1]["messages"]]
    assert [e.response for e in examples] == [None, None]
    with pytest.raises(DataError, match=rf"{path}, row 1: no teacher response.*teacher=api"):
        load(path)  # teacher=dataset needs a response


STANDARD = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "Hi", "completion": "Hello!"}]
CONVERSATIONAL = [
    {"prompt": [user("2+2?")], "completion": [assistant("4")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi")], "completion": [
        assistant("Hello!")
    ]},
]  # fmt: skip


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_trl_prompt_completion_strings_and_message_lists(tmp_path, suffix):
    examples = load(write(tmp_path / f"s{suffix}", STANDARD))
    assert [e.messages for e in examples] == [[user("2+2?")], [user("Hi")]]
    assert [e.response for e in examples] == ["4", "Hello!"]
    schema = pa.schema([("prompt", MESSAGES), ("completion", MESSAGES)])
    examples = load(write(tmp_path / f"c{suffix}", CONVERSATIONAL, schema))
    assert [e.messages for e in examples] == [
        CONVERSATIONAL[0]["prompt"],
        CONVERSATIONAL[1]["prompt"],
    ]
    assert [e.response for e in examples] == ["4", "Hello!"]


def test_the_authors_released_schema_loads_with_the_defaults(tmp_path):
    """ytz20/LMSYS-Chat-GPT-5-Chat-Response: id, content (a list of {content, role}),
    teacher_response; read with no data.prompt_key / data.response_key."""
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("content", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
            ("teacher_response", pa.string()),
        ]
    )
    rows = [
        {"id": "c1", "content": [{"content": "Capital of France?", "role": "user"}],
         "teacher_response": "**Paris**."},
        {"id": "c2", "content": [{"content": "Answer briefly.", "role": "system"},
                                 {"content": "A prime?", "role": "user"}],
         "teacher_response": "7"},
    ]  # fmt: skip
    path = write(tmp_path / "train-00000-of-00001.parquet", rows, schema)
    assert DataConfig(train_path=path).prompt_key is None  # the defaults
    examples = load(path)
    assert [e.id for e in examples] == ["c1", "c2"]
    assert examples[1].messages == [
        {"role": "system", "content": "Answer briefly."},
        user("A prime?"),
    ]
    assert [e.response for e in examples] == ["**Paris**.", "7"]
    jsonl = write(tmp_path / "authors.jsonl", [{"content": "Hi", "teacher_response": "Hello"}])
    assert [(e.messages, e.response) for e in load(jsonl)] == [([user("Hi")], "Hello")]


def test_one_file_may_mix_formats(tmp_path):
    rows = [CONVERSATIONS[0], STANDARD[0], {"content": "x", "teacher_response": "y"}]
    rows.append({"prompt": "p", "response": "r", "lang": "en"})
    examples = load(write(tmp_path / "mix.jsonl", rows))
    assert [e.response for e in examples] == ["4", "4", "y", "r"]
    assert [e.prompt_key for e in examples] == ["messages", "prompt", "content", "prompt"]
    assert examples[3].meta == {"lang": "en", "origin": f"{tmp_path / 'mix.jsonl'}, row 4"}


def test_explicit_keys_win(tmp_path):
    row = {"messages": [user("ignored"), assistant("ignored")], "q": "Q?", "a": "A.",
           "completion": "not this"}  # fmt: skip
    ex = parse_example(row, "f.jsonl", 1, prompt_key="q", response_key="a")
    assert (ex.messages, ex.response) == ([user("Q?")], "A.")
    # only the prompt key given: the response is still recognised (first response column)
    ex = parse_example(row, "f.jsonl", 1, prompt_key="q")
    assert ex.response == "not this"
    # an explicit key is the only column read: no fallback to the recognised formats
    with pytest.raises(
        DataError,
        match=r"f.jsonl, row 1: missing prompt key 'content' \(data.prompt_key; null recog",
    ):
        parse_example({"prompt": "p", "completion": "c"}, "f.jsonl", 1, prompt_key="content")
    with pytest.raises(DataError, match=r"missing response key 'teacher_response' \(data.resp"):
        parse_example(STANDARD[0], "f.jsonl", 1, response_key="teacher_response")


def test_a_row_in_no_format_names_file_row_and_the_formats(tmp_path):
    rows = [STANDARD[0], {"question": "Q?", "answer": "A."}, STANDARD[1]]
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(
        f"{path}, row 2: the row fits no accepted format (row keys: ['answer', 'question']); "
        "accepted row formats: "
    )
    assert all(f in msg for f in FORMATS) and "data.prompt_key / data.response_key" in msg
    assert '"messages"' in msg and '"completion"' in msg and '"teacher_response"' in msg
    examples, stats = load_examples(DataConfig(train_path=path, on_bad_row="skip"))
    assert [e.response for e in examples] == ["4", "Hello!"]
    assert stats["skipped_bad_rows"] == 1 and stats["errors"] == [msg]
    # the mapping the message points to reads such a file
    qa = write(tmp_path / "qa.jsonl", [rows[1]])
    assert [e.response for e in load(qa, prompt_key="question", response_key="answer")] == ["A."]


def test_a_completion_list_holds_one_assistant_message():
    row = {"prompt": "Hi", "completion": [assistant("a"), assistant("b")]}
    with pytest.raises(DataError, match=r"key 'completion' must be a string or a list of one"):
        parse_example(row, "f.jsonl", 3)
    with pytest.raises(DataError, match=r"f.jsonl, row 3: key 'completion'"):
        parse_example({"prompt": "Hi", "completion": [user("a")]}, "f.jsonl", 3)


PROMPT_ONLY = [
    ({"messages": [user("Hi")]}, None, {"messages": [user("Hi"), assistant("T")]}),
    ({"prompt": "Hi"}, None, {"prompt": "Hi", "completion": "T"}),
    ({"prompt": [user("Hi")]}, None, {"prompt": [user("Hi")], "completion": [assistant("T")]}),
    ({"prompt": "Hi", "response": None}, None, {"prompt": "Hi", "response": "T"}),
    ({"content": [user("Hi")], "id": 7}, None, {"content": [user("Hi")], "id": 7,
                                                "teacher_response": "T"}),
    ({"q": "Hi"}, "a", {"q": "Hi", "a": "T"}),
]  # fmt: skip


@pytest.mark.parametrize(("row", "response_key", "expected"), PROMPT_ONLY)
def test_with_response_writes_the_rows_own_format_and_reads_back(row, response_key, expected):
    prompt_key = "q" if response_key else None
    ex = parse_example(row, "f", 1, prompt_key, response_key, require_response=False)
    out = with_response(row, ex, "T", response_key)
    assert out == expected and row != expected  # a copy; the input row is unchanged
    again = parse_example(out, "f", 1, prompt_key, response_key)
    assert (again.messages, again.response) == (ex.messages, "T")
