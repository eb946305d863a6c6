import pytest

from gad_ray.config.schema import EvalSetSpec
from gad_ray.data.dataset import DataError
from gad_ray.eval.sets import get_path, load_set
from gad_ray.synthetic.tasks import write_dataset


def test_lmsys_is_the_default_schema(tmp_path) -> None:
    path = write_dataset(
        tmp_path / "lmsys.parquet",
        [
            {
                "id": "a",
                "content": [{"role": "user", "content": "Hi?"}],
                "teacher_response": "Hello!",
            },
            {
                "id": "b",
                "content": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"},
                ],
                "teacher_response": "4",
            },
        ],
    )
    s = load_set(EvalSetSpec(path=str(path)))
    assert s.name == "lmsys" and s.reference == "set" and s.has_teacher
    assert [it.question for it in s.items] == ["Hi?", "2+2?"]
    assert s.items[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert [(it.reference, it.teacher) for it in s.items] == [("Hello!", "Hello!"), ("4", "4")]


def test_without_a_preset_the_training_row_formats_are_read(tmp_path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey"}]},
        {"prompt": [{"role": "user", "content": "2+2?"}],
         "completion": [{"role": "assistant", "content": "4"}]},
        {"prompt": "Name a colour.", "completion": "Blue."},
    ]  # fmt: skip
    s = load_set(EvalSetSpec(path=str(write_dataset(tmp_path / "trl.jsonl", rows))))
    assert s.reference == "set" and s.has_teacher
    assert [it.question for it in s.items] == ["Hi?", "2+2?", "Name a colour."]
    assert [(it.reference, it.teacher) for it in s.items] == [
        ("Hey", "Hey"), ("4", "4"), ("Blue.", "Blue.")
    ]  # fmt: skip
    prompts = [{"messages": [{"role": "user", "content": "Tips?"}]}]
    path = str(write_dataset(tmp_path / "p.jsonl", prompts))
    s = load_set(EvalSetSpec(path=path, reference="judge"))
    assert [(it.question, it.reference, it.teacher) for it in s.items] == [("Tips?", None, None)]
    with pytest.raises(DataError, match=r"p.jsonl, row 1: no reference answer"):
        load_set(EvalSetSpec(path=path))


def test_dolly_appends_context(tmp_path) -> None:
    rows = [
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
         "category": "summarization"},
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "qa"},
    ]  # fmt: skip
    s = load_set(EvalSetSpec(preset="dolly", path=str(write_dataset(tmp_path / "d.jsonl", rows))))
    assert s.name == "dolly" and not s.has_teacher
    assert [it.question for it in s.items] == ["Summarise.\n\nA long text.", "Name a colour."]
    assert [it.reference for it in s.items] == ["Short.", "Blue."]
    assert s.items[0].category == "summarization"


def test_selfinst_reads_the_first_instance(tmp_path) -> None:
    rows = [
        {"id": "user_oriented_task_0", "instruction": "Fix the grammar.",
         "instances": [{"input": "he go home", "output": "He goes home."}]},
        {"id": "user_oriented_task_1", "instruction": "Write a haiku.",
         "instances": [{"input": "", "output": "Old pond..."}]},
    ]  # fmt: skip
    path = write_dataset(tmp_path / "user_oriented_instructions.jsonl", rows)
    s = load_set(EvalSetSpec(preset="selfinst", path=str(path), name="selfinst-252"))
    assert s.name == "selfinst-252"
    assert [it.question for it in s.items] == ["Fix the grammar.\n\nhe go home", "Write a haiku."]
    assert [it.reference for it in s.items] == ["He goes home.", "Old pond..."]
    assert s.items[0].id == "user_oriented_task_0"


def test_vicuna_text_or_turns_and_judge_reference(tmp_path) -> None:
    rows = [
        {"question_id": 1, "text": "Tips for sleep?", "category": "generic"},
        {"question_id": 2, "turns": ["Write a poem.", "Shorter."], "category": "writing"},
    ]
    s = load_set(EvalSetSpec(preset="vicuna", path=str(write_dataset(tmp_path / "v.jsonl", rows))))
    assert s.reference == "judge"  # the set has no reference answers
    assert [it.question for it in s.items] == ["Tips for sleep?", "Write a poem."]
    assert [it.category for it in s.items] == ["generic", "writing"]
    assert all(it.reference is None for it in s.items)


def test_keys_override_the_preset_and_limit(tmp_path) -> None:
    rows = [{"q": f"Q{i}", "gold": {"answers": [f"A{i}"]}} for i in range(5)]
    spec = EvalSetSpec(
        path=str(write_dataset(tmp_path / "c.jsonl", rows)), prompt_key="q",
        reference_key="gold.answers.0", teacher_key="gold.answers.0", limit=3,
    )  # fmt: skip
    s = load_set(spec)
    assert s.name == "c" and [it.reference for it in s.items] == ["A0", "A1", "A2"]
    assert get_path({"a": [{"b": 1}]}, "a.0.b") == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "x", "response": "y"}, r"row 2: the row fits no accepted format"),
        ({"content": "x"}, r"row 2: no reference answer .*accepted row formats"),
        ({"content": "x", "teacher_response": 3}, r"row 2: key 'teacher_response' must be a str"),
        ({"content": [{"role": "bot", "content": "x"}], "teacher_response": "y"}, "row 2: .*role"),
        ({"content": "  ", "teacher_response": "y"}, "row 2: key 'content' is an empty prompt"),
    ],
)
def test_bad_row_names_file_row_and_key(tmp_path, row: dict, message: str) -> None:
    good = {"content": "ok", "teacher_response": "fine"}
    path = write_dataset(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=f"{path}, {message}"):
        load_set(EvalSetSpec(path=str(path)))


def test_unreadable_sets(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_set(EvalSetSpec(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"content": "a", "teacher_response": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl, row 2: invalid JSON"):
        load_set(EvalSetSpec(path=str(tmp_path / "broken.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_set(EvalSetSpec(path=str(tmp_path / "empty.jsonl")))
