"""bench/quality_report.py and quality_score.score_texts on hand-made results: the paired
verdict rule of docs/quality.md, the GAD-stage trend, the five claims, the table and figure."""

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.quality_report import (  # noqa: E402
    aggregate,
    claims,
    markdown,
    paired,
    plot,
    stage_change,
    verdict,
)
from bench.quality_score import score_texts  # noqa: E402
from gad_ray.data.tokenize import TokenizedExample  # noqa: E402

METRICS = ("score", "accuracy", "framed", "f1", "len_ratio", "top", "minor", "invalid")


def split_scores(**kw) -> dict:
    base = dict.fromkeys(METRICS, 0.5)
    base |= {"acc/copy": 0.5, "framed/copy": 0.5}
    return base | kw


def seed_result(gad: dict, seqkd: dict, frozen_len: list[float], gad_len: list[float]) -> dict:
    def curve(lens: list[float]) -> list[dict]:
        return [{"step": 4 + i, "len_ratio": v, "s_per_step": 1.0} for i, v in enumerate(lens)]

    rows = {
        "before": split_scores(score=0.0, framed=0.0),
        "gad": split_scores(**gad),
        "seqkd": split_scores(**seqkd),
        "gad_frozen_d": split_scores(),
        "teacher": split_scores(score=1.0, top=0.6),
    }
    return {
        "scores": {r: {"id": s, "ood": s} for r, s in rows.items()},
        "curves": {"gad": curve(gad_len), "seqkd": [], "gad_frozen_d": curve(frozen_len)},
        "train_s": {"gad": 10.0, "seqkd": 5.0, "gad_frozen_d": 8.0},
        "teacher_calls": {"gad": 64, "seqkd": 64, "gad_frozen_d": 64, "teacher": 20},
        "warmup_s": 3.0,
    }


def test_paired_difference_and_verdict_rule() -> None:
    results = [{"a": 0.5, "b": 0.3}, {"a": 0.6, "b": 0.3}, {"a": 0.4, "b": 0.3}]
    m, se = paired(results, lambda r: r["a"], lambda r: r["b"])
    assert math.isclose(m, 0.2) and math.isclose(se, 0.1 / math.sqrt(3))
    assert verdict(m, se) == "ahead" and verdict(-m, se) == "behind"
    assert verdict(0.05, 0.1) == "tie"
    assert paired(results[:1], lambda r: r["a"], lambda r: r["b"])[1] == 0.0


def test_stage_change_is_last_third_minus_first_third() -> None:
    pts = [(i, v) for i, v in enumerate([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])]
    assert stage_change(pts) == 2.0
    assert stage_change(pts[:1]) is None


def test_claims_follow_the_rules() -> None:
    ahead = dict(score=0.8, f1=0.4, framed=0.9, top=0.9)
    behind = dict(score=0.6, f1=0.6, framed=0.9, top=0.6)
    flat, growing = [1.0] * 6, [1.0, 1.0, 1.2, 1.4, 1.6, 1.8]
    results = [seed_result(ahead, behind, growing, flat) for _ in range(3)]
    got = {c.split(".")[0]: v for c, v, _ in claims(results, warmup=4)}
    assert got == {"1": "yes", "2": "yes", "3": "yes", "4": "yes", "5": "yes"}
    results = [seed_result(behind, ahead, flat, flat) for _ in range(3)]
    got = {c.split(".")[0]: v for c, v, _ in claims(results, warmup=4)}
    assert got == {"1": "no", "2": "no", "3": "no", "4": "no", "5": "no"}


def test_markdown_and_plot(tmp_path) -> None:
    results = [
        seed_result(dict(score=s), dict(score=0.5), [1.0, 1.1], [1.0, 1.0]) for s in (0.6, 0.7)
    ]
    agg = aggregate(results)
    assert math.isclose(agg["gad"]["id"]["score"][0], 0.65)
    meta = {
        "preset": dict(seeds=2, warmup=4, gad=2, prompts=16, eval_n=8, samples=4),
        "command": "python bench/quality.py",
        "minutes": 1.0,
        "competence": {"pretrain_s": 5.0, "competence": {"copy": 0.9}},
    }
    table = markdown(agg, results, meta)
    assert "| gad | 64 | 10 | 0.65 ± 0.07 |" in table
    assert "| seqkd | 64 | 5 |" in table
    assert "| teacher | 20 | - | 1.00 ± 0.00 |" in table
    assert "| gad_frozen_d | 1 | - | +0.10 |" in table
    assert "## The paper's claims here" in table
    png = plot(agg, results, meta["preset"], tmp_path / "q.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def example(prompt: str, response: str, task: str, n_tokens: int) -> TokenizedExample:
    messages = [{"role": "user", "content": prompt}]
    return TokenizedExample("x", [1], [0] * n_tokens, False, messages, response, {"task": task})


def test_score_texts_counts_content_style_and_modes() -> None:
    examples = [
        example("Copy the words: cat dog", "Answer: cat dog.", "copy", 8),
        example("Copy the words: sun", "Answer: sun.", "copy", 4),
        example("Name a fruit that is red.", "Answer: apple.", "fruit", 4),
    ]
    texts = ["Answer: cat dog.", "sun", "Answer: banana."]
    sampled = {"Name a fruit that is red.": ["apple", "Answer: cherry.", "kiwi", "Answer: apple."]}
    row = score_texts(examples, texts, [8, 2, 5], sampled)
    assert row["score"] == 1 / 3 and row["accuracy"] == 2 / 3 and row["framed"] == 2 / 3
    assert row["acc/copy"] == 1.0 and row["framed/copy"] == 0.5 and row["acc/fruit"] == 0.0
    assert math.isclose(row["len_ratio"], 5 / (16 / 3))
    assert (row["top"], row["minor"], row["invalid"]) == (0.5, 0.25, 0.25)
    assert math.isclose(row["f1"], (1.0 + 2 / 3 + 0.5) / 3)  # sun vs answer sun: P 1, R 1/2
