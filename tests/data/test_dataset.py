import json
import os
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gad_ray.config.schema import DataConfig
from gad_ray.data.dataset import DataError, Example, load_examples, load_rows, parse_example
from gad_ray.synthetic.tasks import make_dataset

PAPER_ROWS = [
    {"id": "a", "content": "What is 2+2?", "teacher_response": "4"},
    {
        "content": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a color."},
        ],
        "teacher_response": "Red.",
        "lang": "en",
    },
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(path: str, **kw) -> DataConfig:
    return DataConfig(train_path=path, **kw)


def check_paper_examples(examples: list[Example], source: str, second_index: int) -> None:
    first = examples[0]
    assert (first.id, first.messages, first.response) == (
        "a",
        [{"role": "user", "content": "What is 2+2?"}],
        "4",
    )
    assert first.meta["origin"] == f"{source}, row {second_index - 1}"
    assert examples[1].id == f"{source}:{second_index}"
    assert examples[1].messages == PAPER_ROWS[1]["content"]
    assert examples[1].response == "Red."
    assert examples[1].meta["lang"] == "en"


def test_jsonl_rows_numbered_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAPER_ROWS[0]) + "\n\n" + json.dumps(PAPER_ROWS[1]) + "\n")
    rows = list(load_rows(str(path)))
    assert [(s, i) for s, i, _ in rows] == [(str(path), 1), (str(path), 3)]
    assert rows[1][2] == PAPER_ROWS[1]
    assert len(list(load_rows(str(path), limit=1))) == 1


def test_jsonl_paper_schema(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PAPER_ROWS)
    examples, stats = load_examples(cfg(path))
    check_paper_examples(examples, path, 2)
    assert stats == {"rows": 2, "examples": 2, "skipped_bad_rows": 0, "errors": []}


def table_rows() -> list[dict]:
    """PAPER_ROWS with one column type each (Arrow needs it): messages lists, all keys."""
    first = dict(PAPER_ROWS[0], content=[{"role": "user", "content": PAPER_ROWS[0]["content"]}])
    return [dict(first, lang=None), dict(PAPER_ROWS[1], id=None)]


def test_parquet(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(table_rows()), path)
    examples, _ = load_examples(cfg(path))
    check_paper_examples(examples, path, 1)  # parquet rows are numbered from 0


def test_hf_disk_dataset_and_dataset_dict(tmp_path):
    ds = datasets.Dataset.from_list(table_rows())
    ds.save_to_disk(str(tmp_path / "ds"))
    examples, _ = load_examples(cfg(str(tmp_path / "ds")))
    check_paper_examples(examples, str(tmp_path / "ds"), 1)

    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    examples, _ = load_examples(cfg(str(tmp_path / "dd"), split="test"))
    assert [e.response for e in examples] == ["Red."]
    with pytest.raises(DataError, match=r"no split 'dev'.*\['test', 'train'\]"):
        load_examples(cfg(str(tmp_path / "dd"), split="dev"))


def test_plain_prompt_response_schema(tmp_path):
    rows = [
        {"prompt": "Hi", "response": "Hello"},
        {"prompt": [{"role": "user", "content": "Yo"}], "response": "Hey"},
    ]
    examples, _ = load_examples(cfg(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert [e.messages for e in examples] == [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Yo"}],
    ]
    assert [e.response for e in examples] == ["Hello", "Hey"]


def test_configured_keys_and_system_prompt():
    row = {"q": "Hi", "a": "Hello"}
    ex = parse_example(row, "f.jsonl", 1, "q", "a", system_prompt="You help.")
    assert ex.messages == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Hi"},
    ]
    assert ex.response == "Hello"
    row = {"content": [{"role": "system", "content": "Own."}, {"role": "user", "content": "x"}]}
    ex = parse_example(row, "f.jsonl", 1, system_prompt="You help.", require_response=False)
    assert ex.messages[0] == {"role": "system", "content": "Own."} and len(ex.messages) == 2
    assert ex.response is None


def test_synthetic_source():
    path = "synthetic:train?n=6&seed=3&min_len=2&max_len=3&tasks=reverse,sort"
    examples, stats = load_examples(cfg(path))
    rows = make_dataset(6, 3, ["reverse", "sort"], 2, 3)
    assert stats["examples"] == 6
    assert [e.id for e in examples] == [r["id"] for r in rows]
    assert [e.messages for e in examples] == [r["content"] for r in rows]
    assert [e.response for e in examples] == [r["teacher_response"] for r in rows]
    assert {e.meta["task"] for e in examples} <= {"reverse", "sort"}
    examples, _ = load_examples(cfg("synthetic:eval?n=3&with_teacher=0"), require_response=False)
    assert [e.response for e in examples] == [None] * 3
    with pytest.raises(DataError, match="unknown parameter.*'bogus'"):
        load_examples(cfg("synthetic:train?n=2&bogus=1"))
    with pytest.raises(DataError, match=r"missing the number of rows"):
        load_examples(cfg("synthetic:train"))
    with pytest.raises(DataError, match=r"synthetic:train\?n=2&tasks=nope.*unknown tasks"):
        load_examples(cfg("synthetic:train?n=2&tasks=nope"))


def test_limit(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(5)]
    )
    examples, stats = load_examples(cfg(path, limit=3))
    assert [e.messages[0]["content"] for e in examples] == ["p0", "p1", "p2"]
    assert stats["rows"] == 3


def test_missing_file_and_unknown_suffix(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"data file '{missing}' does not exist"):
        load_examples(cfg(missing))
    with pytest.raises(DataError, match="'data/train.parquet' does not exist"):
        list(load_rows("data/train.parquet"))
    with pytest.raises(DataError, match="does not exist"):
        list(load_rows(str(tmp_path / "x"), fmt="jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d.csv.*cannot infer the format.*'\.csv'"):
        list(load_rows(str(tmp_path / "d.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="'.*empty' is not a datasets save_to_disk directory"):
        list(load_rows(str(tmp_path / "empty")))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet.*not a readable Parquet file"):
        list(load_rows(str(tmp_path / "bad.parquet")))


def test_hub_name_is_tried_when_not_local():
    """A name that is not a local path goes to datasets.load_dataset (offline here: a clear error)."""
    code = (
        "from gad_ray.data.dataset import DataError, load_rows\n"
        "try:\n    list(load_rows('nobody/no-such-dataset', split='train'))\n"
        "except DataError as e:\n    print(e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "'nobody/no-such-dataset' is neither a local file/directory nor a loadable hub" in (
        out.stdout
    ), out.stderr


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": \n{"prompt": "c", "response": "d"}\n'
    )
    with pytest.raises(DataError, match=rf"{path}, row 2: invalid JSON"):
        load_examples(cfg(str(path)))
    examples, stats = load_examples(cfg(str(path), on_bad_row="skip"))
    assert [e.response for e in examples] == ["b", "d"]
    assert stats["rows"] == 3 and stats["skipped_bad_rows"] == 1
    assert stats["errors"][0].startswith(f"{path}, row 2: invalid JSON")


BAD_ROWS = [
    ({"response": "r"}, "the row fits no accepted format (row keys: ['response'])"),
    ({"content": 5, "teacher_response": "r"}, "key 'content' must be a string or a list"),
    ({"content": "", "teacher_response": "r"}, "key 'content' is an empty prompt"),
    ({"content": [], "teacher_response": "r"}, "key 'content' is an empty list"),
    ({"content": [{"role": "user"}], "teacher_response": "r"}, "key 'content', message 0 must"),
    (
        {
            "content": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
            "teacher_response": "r",
        },
        "key 'content', message 1 has unknown role 'tool'",
    ),
    (
        {"content": [{"role": "user", "content": 3}], "teacher_response": "r"},
        "key 'content', message 0 content must be a string, got int",
    ),
    (
        {"content": [{"role": "system", "content": "s"}], "teacher_response": "r"},
        "key 'content' has only system messages",
    ),
    ({"content": "hi"}, "no teacher response: no column teacher_response / completion"),
    ({"content": "hi", "teacher_response": None}, "no teacher response: no column"),
    ({"content": "hi", "teacher_response": ["x"]}, "key 'teacher_response' must be a string"),
    ({"prompt": "hi", "completion": 3}, "key 'completion' must be a string or a list of one"),
    (
        {"messages": [{"role": "assistant", "content": "a"}]},
        "key 'messages' has no prompt before its assistant turn",
    ),
    ({"messages": [{"role": "user", "content": "q"}]}, "no teacher response"),
    ([1, 2], "expected an object, got [1, 2]"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_malformed_row_names_file_row_and_key(tmp_path, row, message):
    good = {"content": "ok", "teacher_response": "fine"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, row, good])
    with pytest.raises(DataError) as err:
        load_examples(cfg(path))
    assert str(err.value).startswith(f"{path}, row 2: ")
    assert message in str(err.value)
    examples, stats = load_examples(cfg(path, on_bad_row="skip"))
    assert len(examples) == 2
    assert stats == {"rows": 3, "examples": 2, "skipped_bad_rows": 1, "errors": [str(err.value)]}


def test_skip_counts_many_and_reports_first_few(tmp_path):
    rows = [{"content": "ok", "teacher_response": "r"}] + [{"content": ""}] * 8
    examples, stats = load_examples(cfg(write_jsonl(tmp_path / "d.jsonl", rows), on_bad_row="skip"))
    assert len(examples) == 1 and stats["skipped_bad_rows"] == 8 and len(stats["errors"]) == 5
    assert ", row 2: " in stats["errors"][0] and ", row 6: " in stats["errors"][4]


def test_response_not_required(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "hi"}])
    examples, _ = load_examples(cfg(path), require_response=False)
    assert examples[0].response is None and examples[0].id == f"{path}:1"
