import json
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gad_ray.synthetic.tasks import (
    ANIMALS,
    FRUITS,
    TASKS,
    Verdict,
    answer_distribution,
    check,
    main,
    make_dataset,
    make_prompt,
    most_probable_answer,
    score_responses,
    styled,
    teacher_answer,
    unframe,
    write_dataset,
)

DETERMINISTIC = {
    "Copy the words: cat dog sun": "cat dog sun",
    "Uppercase the words: cat dog sun": "CAT DOG SUN",
    "Reverse the words: cat dog sun": "sun dog cat",
    "Sort the numbers: 12 5 40 7": "5 7 12 40",
    "Add the numbers: 3 5 9": "17",
}


@pytest.mark.parametrize(("prompt", "answer"), DETERMINISTIC.items())
def test_deterministic_teacher_answers(prompt: str, answer: str) -> None:
    rng = random.Random(0)
    assert {teacher_answer(prompt, rng) for _ in range(20)} == {answer}
    assert teacher_answer(prompt, None) == answer
    assert check(prompt, answer) == Verdict(
        task=answer_distribution(prompt)[0], correct=True, most_probable=True, valid=True
    )


@pytest.mark.parametrize(("prompt", "answer"), DETERMINISTIC.items())
def test_check_rejects_wrong_and_trailing_junk(prompt: str, answer: str) -> None:
    assert check(prompt, f"  {answer}\n").correct
    for wrong in (f"{answer} extra", f"{answer}.", "", "42 cat", answer[::-1] + "x"):
        verdict = check(prompt, wrong)
        assert not verdict.correct and not verdict.valid and not verdict.most_probable


def test_multimodal_minor_answers_are_valid_but_not_most_probable() -> None:
    prompt = "Name a fruit that is red."
    assert most_probable_answer(prompt) == "apple"
    assert check(prompt, "apple") == Verdict("fruit", True, True, True)
    assert check(prompt, " cherry ") == Verdict("fruit", True, False, True)
    assert check(prompt, "strawberry") == Verdict("fruit", True, False, True)
    assert check(prompt, "banana") == Verdict("fruit", False, False, False)
    assert check(prompt, "apple pie") == Verdict("fruit", False, False, False)
    assert check("Give a synonym of big.", "huge") == Verdict("synonym", True, False, True)


def test_multimodal_sampling_follows_probabilities_and_temperature() -> None:
    prompt = "Name a fruit that is red."
    rng = random.Random(1)
    counts = Counter(teacher_answer(prompt, rng) for _ in range(3000))
    assert set(counts) == set(FRUITS["red"])
    for answer, p in FRUITS["red"].items():
        assert abs(counts[answer] / 3000 - p) < 0.04
    assert {teacher_answer(prompt, rng, temperature=0) for _ in range(50)} == {"apple"}
    assert {teacher_answer(prompt, None, temperature=1.5) for _ in range(50)} == {"apple"}
    cold = Counter(teacher_answer(prompt, rng, temperature=0.3) for _ in range(1000))
    assert cold["apple"] / 1000 > 0.85


def test_unrecognised_and_malformed_prompts_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="no synthetic task recognises the prompt 'Hello there'"):
        teacher_answer("Hello there")
    with pytest.raises(ValueError, match="sort prompt must list non-negative integers"):
        teacher_answer("Sort the numbers: 3 x 5")
    with pytest.raises(ValueError, match="fruit prompt asks about 'blue'"):
        check("Name a fruit that is blue.", "apple")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        teacher_answer("Copy the words: a", random.Random(0), temperature=-1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_prompt("nope", random.Random(0), 3)
    with pytest.raises(ValueError, match="length must be >= 1"):
        make_prompt("copy", random.Random(0), 0)


@settings(max_examples=60, deadline=None)
@given(
    task=st.sampled_from(sorted(TASKS)),
    length=st.integers(1, 12),
    seed=st.integers(0, 2**32),
)
def test_generated_prompts_are_recognised_and_answerable(task: str, length: int, seed: int) -> None:
    rng = random.Random(seed)
    prompt = make_prompt(task, rng, length)
    assert answer_distribution(prompt)[0] == task
    greedy = teacher_answer(prompt, None)
    assert check(prompt, greedy).most_probable
    assert check(prompt, teacher_answer(prompt, rng)).valid
    if not TASKS[task].multimodal:
        assert len(prompt.split()) == len(TASKS[task].prefix.split()) + length
        assert 1 <= len(greedy.split()) <= length


def test_make_dataset_is_deterministic_and_in_paper_schema() -> None:
    rows = make_dataset(50, seed=3)
    assert rows == make_dataset(50, seed=3)
    assert rows != make_dataset(50, seed=4)
    assert len({r["id"] for r in rows}) == 50
    assert {r["task"] for r in rows} == set(TASKS)
    for r in rows:
        assert set(r) == {"id", "task", "content", "teacher_response"}
        [message] = r["content"]
        assert message["role"] == "user"
        verdict = check(message["content"], r["teacher_response"])
        assert verdict.task == r["task"] and verdict.valid
    bare = make_dataset(50, seed=3, with_teacher=False)
    assert [r["content"] for r in bare] == [r["content"] for r in rows]
    assert all("teacher_response" not in r for r in bare)


def test_make_dataset_out_of_domain_lengths_give_longer_prompts() -> None:
    tasks = ["reverse", "sort", "add"]
    train = make_dataset(100, seed=0, tasks=tasks, min_len=2, max_len=5)
    held = make_dataset(100, seed=1, tasks=tasks, min_len=8, max_len=10)
    assert {r["task"] for r in train} == set(tasks)
    train_max = max(len(r["content"][0]["content"].split()) for r in train)
    held_min = min(len(r["content"][0]["content"].split()) for r in held)
    assert held_min > train_max
    with pytest.raises(ValueError, match="need 1 <= min_len <= max_len"):
        make_dataset(3, seed=0, min_len=6, max_len=5)
    with pytest.raises(ValueError, match=r"unknown tasks \['mul'\]"):
        make_dataset(3, seed=0, tasks=["add", "mul"])


def test_score_responses_per_task_and_multimodal_shares() -> None:
    prompts = [
        "Reverse the words: a b",
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Add the numbers: 1 2"},
        ],
        "Add the numbers: 4 4",
        "Name a fruit that is red.",
        "Name a fruit that is red.",
        "Name a fruit that is red.",
        "Name a fruit that is red.",
    ]
    responses = ["b a", "3", "9", "apple", "cherry", "apple", "kiwi"]
    score = score_responses(prompts, responses)
    assert score["overall"] == {"n": 7, "accuracy": 5 / 7, "framed": 0.0}
    assert score["tasks"]["reverse"] == {"n": 1, "accuracy": 1.0, "framed": 0.0}
    assert score["tasks"]["add"] == {"n": 2, "accuracy": 0.5, "framed": 0.0}
    assert score["tasks"]["fruit"] == {
        "n": 4,
        "accuracy": 0.75,
        "framed": 0.0,
        "most_probable": 0.5,
        "valid_minor": 0.25,
        "invalid": 0.25,
    }
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_responses(prompts[:2], responses[:1])


def test_framed_style_is_scored_for_content_and_style() -> None:
    prompt = "Reverse the words: cat dog"
    assert teacher_answer(prompt, None, style="framed") == "Answer: dog cat."
    assert styled("dog cat", "plain") == "dog cat"
    assert check(prompt, "Answer: dog cat.") == Verdict("reverse", True, True, True, True)
    assert check(prompt, " Answer:  dog cat . ") == Verdict("reverse", True, True, True, True)
    # the frame opened but not closed: the content counts, the style does not
    assert check(prompt, "Answer: dog cat") == Verdict("reverse", True, True, True, False)
    for wrong in ("Answer: cat dog.", "Answer: dog cat. extra", "dog cat.", "Answer dog cat."):
        assert not check(prompt, wrong).correct, wrong
    # the student's other formats: correct content, not the teacher's style
    for other in ("Result: dog cat", "Sure, dog cat.", "It is dog cat.", "Here: dog cat"):
        assert check(prompt, other) == Verdict("reverse", True, True, True, False), other
    assert unframe("Sure, dog cat") == ("dog cat", "partial")
    assert unframe("Answer: dog cat.") == ("dog cat", "framed")
    assert unframe("dog cat.") == ("dog cat.", "plain")
    assert check("Name a fruit that is red.", "Answer: cherry.") == Verdict(
        "fruit", True, False, True, True
    )
    score = score_responses([prompt, prompt, prompt], ["Answer: dog cat.", "dog cat", "x"])
    assert score["overall"] == {"n": 3, "accuracy": 2 / 3, "framed": 1 / 3}
    rows = make_dataset(30, seed=0, tasks=["copy", "animal"], style="framed")
    assert all(check(r["content"][0]["content"], r["teacher_response"]).framed for r in rows)
    with pytest.raises(ValueError, match="unknown answer style 'bold'"):
        make_dataset(3, seed=0, style="bold")


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("Give the last word: cat dog sun", "sun"),
        ("Count the words: cat dog sun", "3"),
        ("Count the words: moon", "1"),
    ],
)
def test_new_deterministic_families(prompt: str, answer: str) -> None:
    assert teacher_answer(prompt, random.Random(0)) == answer
    assert check(prompt, answer).correct


def test_animal_family_is_multimodal() -> None:
    prompt = "Name an animal that can fly."
    assert answer_distribution(prompt) == ("animal", ANIMALS["fly"])
    assert most_probable_answer(prompt) == "bird"
    assert check(prompt, "bat") == Verdict("animal", True, False, True)
    assert not check(prompt, "fish").valid


def test_write_dataset_jsonl_and_parquet_round_trip(tmp_path) -> None:
    rows = make_dataset(12, seed=5)
    jsonl = write_dataset(tmp_path / "sub" / "d.jsonl", rows)
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == rows
    parquet = write_dataset(tmp_path / "d.parquet", rows)
    assert pq.read_table(parquet).to_pylist() == rows


def test_cli_writes_dataset_and_rejects_bad_tasks(tmp_path, capsys) -> None:
    out = tmp_path / "d.jsonl"
    main(["--out", str(out), "--n", "7", "--seed", "2", "--tasks", "sort,fruit", "--no-teacher"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == make_dataset(7, seed=2, tasks=["sort", "fruit"], with_teacher=False)
    assert "wrote 7 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--n", "3", "--tasks", "sort,bogus"])
    assert "unknown tasks ['bogus']" in capsys.readouterr().err
