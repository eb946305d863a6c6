import csv
import math

import pytest

from gad_ray.eval.report import aggregate, write_report


def record(model: str, name: str, score: float | None, status: str = "ok", **kw) -> dict:
    base = {
        "model": model, "set": name, "score": score, "judge_status": status, "words": 4,
        "tokens": None, "finish_reason": None, "truncated_prompt": False, "ngram_f1": None,
        "rouge_l": None,
    }  # fmt: skip
    return base | kw


def test_aggregate_counts_and_clips_the_interval() -> None:
    recs = [
        record("a", "s", 10.0, ngram_f1=1.0, rouge_l=0.5, words=2),
        record("a", "s", 9.0, ngram_f1=0.0, rouge_l=0.5, words=6),
        record("a", "s", None, "unparseable"),
        record("a", "s", None, "failed", words=None),
        record("b", "s", 3.0, tokens=8, finish_reason="length", truncated_prompt=True),
    ]
    a, b = aggregate(recs)
    assert (a["n"], a["scored"], a["unparseable"], a["failed"]) == (4, 2, 1, 1)
    assert a["score"] == 9.5 and a["ci_high"] == 10.0  # t interval 9.5 +- 6.35, clipped
    assert a["ci_low"] == pytest.approx(9.5 - 12.7062 * math.sqrt(0.5) / math.sqrt(2), abs=1e-3)
    assert (a["ngram_f1"], a["rouge_l"]) == (0.5, 0.5)
    assert (a["words_mean"], a["words_median"], a["words_max"]) == (4.0, 4.0, 6.0)
    assert math.isnan(a["tokens_mean"]) and a["truncated"] == 0
    assert (b["score"], b["ci_low"], b["ci_high"]) == (3.0, 3.0, 3.0)
    assert (b["tokens_mean"], b["truncated"], b["truncated_prompts"]) == (8.0, 1, 1)
    assert math.isnan(b["ngram_f1"])


def test_write_report_files(tmp_path) -> None:
    recs = [
        record("teacher", "lmsys", 8.0),
        record("gad", "lmsys", 6.0),
        record("gad", "dolly", None, "unparseable"),
    ]
    rows = write_report(recs, tmp_path)
    assert len(rows) == 3 and len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[2]["score"] == "" and table[2]["unparseable"] == "1"
    md = (tmp_path / "results.md").read_text()
    assert "| model | lmsys | dolly |" in md
    assert "| teacher | 8.00 [8.00, 8.00] | - |" in md and "| gad | 6.00 [6.00, 6.00] | n/a |" in md
    assert (tmp_path / "scores.png").stat().st_size > 1000
