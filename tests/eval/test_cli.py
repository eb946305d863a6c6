"""gad-eval end to end: real vLLM (CPU) generation with a tiny model, the synthetic server as the
judge (and teacher) over HTTP through the real openai client, the report files."""

import csv
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gad_ray.data.dataset import DataError
from gad_ray.eval.cli import EvalError, run_eval
from gad_ray.eval.metrics import mean_ci, ngram_f1
from gad_ray.hydra_app import compose
from gad_ray.models.loading import ModelLoadError
from gad_ray.synthetic.judge import NO_RATING_MARKER
from gad_ray.synthetic.server import RunningServer, start_server_thread
from gad_ray.synthetic.tasks import check, make_dataset, most_probable_answer, write_dataset

KEY_ENV = "GAD_EVAL_TEST_KEY"


@pytest.fixture(scope="module")
def judge(ray_session) -> Iterator[RunningServer]:
    """The synthetic judge; gad-eval joins the shared Ray (its engines run there)."""
    with pytest.MonkeyPatch.context() as mp, start_server_thread(seed=0) as server:
        mp.setenv(KEY_ENV, "unused")
        yield server


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    rows = make_dataset(8, seed=5)
    marker = f"Copy the words: cat {NO_RATING_MARKER}"
    rows.append({"id": "marker", "content": marker, "teacher_response": "cat"})
    vicuna = [
        {"question_id": i, "text": r["content"][0]["content"], "category": r["task"]}
        for i, r in enumerate(make_dataset(3, seed=6))
    ]
    return {
        "syn": write_dataset(root / "syn.jsonl", rows),
        "vicuna": write_dataset(root / "vicuna.jsonl", vicuna),
    }


def overrides(judge: RunningServer, out: Path, *extra: str) -> list[str]:
    return [
        f"eval.judge.base_url={judge.base_url}",
        "eval.judge.model=synthetic-judge",
        f"eval.judge.api_key_env={KEY_ENV}",
        "eval.max_new_tokens=8",
        f"eval.output_dir={out}",
        f"trainer.run_dir={out}",
        *extra,
    ]


def expected_score(question: str, answer: str) -> float:
    """The synthetic judge's documented rule (gad_ray.synthetic.judge.judge_rating)."""
    v = check(question, answer)
    if v.most_probable:
        return 10.0
    if v.valid:
        return 7.0
    return 1.0 + math.floor(4 * ngram_f1(answer, most_probable_answer(question)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_models_and_teacher_are_generated_judged_and_reported(
    judge: RunningServer, data: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    judge.reset()
    cfg = compose(
        overrides(
            judge,
            tmp_path,
            f"eval.models=[{{name: tiny, path: '{tiny_model_dir}'}}]",
            f"eval.sets=[{{name: syn, path: '{data['syn']}'}}, "
            f"{{preset: vicuna, path: '{data['vicuna']}'}}]",
        )
    )
    rows = run_eval(cfg)
    records = read_jsonl(tmp_path / "samples.jsonl")
    by = {(r["model"], r["set"]): r for r in rows}
    assert list(by) == [("teacher", "syn"), ("tiny", "syn"), ("tiny", "vicuna")]
    for key, row in by.items():
        recs = [r for r in records if (r["model"], r["set"]) == key]
        marked = [r for r in recs if NO_RATING_MARKER in r["question"]]
        assert row["n"] == len(recs) == (9 if key[1] == "syn" else 3)
        # the marker row's judge answer has no rating: counted, not fatal, not guessed
        assert [r["judge_status"] for r in marked] == ["unparseable"] * len(marked)
        assert all(r["score"] is None and r["judge_reply"] for r in marked)
        assert row["unparseable"] == len(marked) and row["failed"] == 0
        scored = [r for r in recs if r not in marked]
        for r in scored:
            assert r["judge_status"] == "ok"
            assert r["score"] == expected_score(r["question"], r["response"])
        mean, low, high = mean_ci([r["score"] for r in scored])
        assert row["scored"] == len(scored)
        assert row["score"] == pytest.approx(mean)
        assert row["ci_low"] == pytest.approx(max(low, 1.0))
        assert row["ci_high"] == pytest.approx(min(high, 10.0))
        if key[0] == "tiny":
            assert all(r["tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in recs)
            assert row["truncated"] == sum(r["finish_reason"] == "length" for r in recs)
    teacher = [r for r in records if r["model"] == "teacher"]
    assert all(r["ngram_f1"] == 1.0 and r["rouge_l"] == 1.0 for r in teacher)
    assert by[("teacher", "syn")]["score"] >= 7.0
    # vicuna has no references: the judge wrote them first (the synthetic teacher's greedy answer)
    for r in records:
        if r["set"] == "vicuna":
            assert r["reference_source"] == "judge" and r["ngram_f1"] is None
            assert r["reference"] == most_probable_answer(r["question"])
    # report files
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(t["model"], t["set"]) for t in table] == list(by)
    assert float(table[1]["score"]) == pytest.approx(by[("tiny", "syn")]["score"], abs=1e-4)
    assert table[0]["tokens_mean"] == ""  # the teacher row has no token counts
    md = (tmp_path / "results.md").read_text()
    assert "| model | syn | vicuna |" in md and "| teacher | " in md and " | - |" in md
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # requests: 3 references + one judgement per scored-or-unparseable sample
    assert judge.stats()["total_requests"] == 3 + len(records)


def test_teacher_api_row_and_rerun_pays_nothing_twice(
    judge: RunningServer, data: dict[str, Path], tmp_path: Path
) -> None:
    judge.reset()
    cfg = compose(
        overrides(
            judge,
            tmp_path,
            "eval.teacher=api",
            f"teacher.api.base_url={judge.base_url}",
            "teacher.api.model=synthetic-teacher",
            f"teacher.api.api_key_env={KEY_ENV}",
            f"eval.sets=[{{name: syn, path: '{data['syn']}'}}]",
        )
    )
    first = run_eval(cfg)
    asked = judge.stats()["total_requests"]
    assert asked == 2 * 9  # 9 teacher answers + 9 judgements
    records = read_jsonl(tmp_path / "samples.jsonl")
    # greedy teacher: the most probable answer everywhere, so 10 wherever there is a rating
    assert {r["score"] for r in records} == {10.0, None}
    assert first[0]["model"] == "teacher" and first[0]["score"] == 10.0
    assert first[0]["unparseable"] == 1
    assert run_eval(cfg) == first
    assert judge.stats()["total_requests"] == asked  # everything came from the durable cache


def test_missing_model_fails_before_any_engine_or_request(
    judge: RunningServer, data: dict[str, Path], tmp_path: Path
) -> None:
    judge.reset()
    missing = tmp_path / "no-such-checkpoint"
    cfg = compose(
        overrides(
            judge,
            tmp_path,
            f"eval.models=[{{name: gad, path: '{missing}'}}]",
            f"eval.sets=[{{path: '{data['syn']}'}}]",
        )
    )
    with pytest.raises(ModelLoadError, match=f"directory '{missing}' does not exist"):
        run_eval(cfg)
    assert judge.stats()["total_requests"] == 0


def test_config_problems_are_named(judge: RunningServer, data: dict[str, Path], tmp_path) -> None:
    sets = f"eval.sets=[{{path: '{data['syn']}'}}]"
    cfg = compose(overrides(judge, tmp_path, sets, "eval.teacher=none"))
    with pytest.raises(EvalError, match="nothing to evaluate"):
        run_eval(cfg)
    cfg = compose(overrides(judge, tmp_path, sets, "eval.judge.api_key_env=GAD_EVAL_NO_SUCH_KEY"))
    with pytest.raises(Exception, match="environment variable GAD_EVAL_NO_SUCH_KEY is not set"):
        run_eval(cfg)
    twice = f"eval.sets=[{{path: '{data['syn']}'}}, {{path: '{data['syn']}'}}]"
    with pytest.raises(EvalError, match=r"eval set names \['syn', 'syn'\] repeat"):
        run_eval(compose(overrides(judge, tmp_path, twice)))


def test_cli_bad_row_exits_2_naming_file_and_row(judge: RunningServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "Add the numbers: 1 2", "teacher_response": "3"}\n{"content": 7}\n')
    with pytest.raises(DataError):  # in process: the same error the CLI prints
        run_eval(compose(overrides(judge, tmp_path, f"eval.sets=[{{path: '{bad}'}}]")))
    out = subprocess.run(
        [str(Path(sys.executable).parent / "gad-eval"), *overrides(judge, tmp_path),
         f"eval.sets=[{{path: '{bad}'}}]"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"error: {bad}, row 2: key 'content' must be a string or a list" in out.stderr
