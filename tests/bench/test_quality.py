"""bench/quality.py --quick end to end on the testbed (docs/quality.md): the pre-trained student
is competent (>= 0.5 greedy accuracy on every family, in its own style), the pipeline trains
every method on the same teacher responses and writes its table, verdicts and figure. The
ranking of the methods is not checked: a few steps decide nothing."""

import json
import subprocess
import sys
from pathlib import Path

from gad_ray.synthetic.student import HELD_OUT_TASKS, IN_DOMAIN_TASKS, PRETRAIN_TASKS

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("gad", "seqkd", "gad_frozen_d", "opd")
ROWS = ("before", *METHODS, "teacher")


def test_quality_quick(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick"]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--work", str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,  # the first run on a clean machine pre-trains the student
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())

    # the student before distillation: competent on every family (the build's own check, 64
    # prompts per family) and, scored through vLLM here, in its own style only
    competence = saved["competence"]["competence"]
    assert set(competence) == set(PRETRAIN_TASKS)
    assert all(acc >= 0.5 for acc in competence.values()), competence
    [result] = saved["results"]
    scores = result["scores"]
    assert list(scores) == list(ROWS)
    before = scores["before"]
    for split, tasks in (("id", IN_DOMAIN_TASKS), ("ood", HELD_OUT_TASKS)):
        assert {k.split("/")[1] for k in before[split] if k.startswith("acc/")} == set(tasks)
        assert before[split]["accuracy"] >= 0.5, before[split]
        assert before[split]["framed"] == 0.0 and before[split]["score"] == 0.0
        assert scores["teacher"][split]["score"] == 1.0  # the checker accepts the teacher
    for row in ROWS:
        for split in ("id", "ood"):
            s = scores[row][split]
            assert 0.0 <= s["score"] <= s["accuracy"] <= 1.0 and s["len_ratio"] > 0
            shares = [s[k] for k in ("top", "minor", "invalid")]
            assert abs(sum(shares) - 1.0) < 1e-9  # both splits hold a multi-modal family

    # equal teacher budget; every method trained and timed; the resumed ones from the warmup
    calls = result["teacher_calls"]
    assert len({calls[m] for m in METHODS}) == 1 and calls["gad"] == 2 * 8  # warmup x prompts
    assert all(result["train_s"][m] > 0 for m in METHODS)
    warmup = saved["preset"]["warmup"]
    for method in ("seqkd", "gad_frozen_d", "opd"):
        rows = (work / "runs" / f"{method}-s0" / "metrics.jsonl").read_text().splitlines()
        assert min(json.loads(r)["step"] for r in rows) == warmup
    for method in ("gad", "gad_frozen_d"):
        assert any("len_ratio" in r and r["step"] >= warmup for r in result["curves"][method])

    table = (out / "quality.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method | calls"))
    for column in ("ID score", "OOD acc", "ID style", "ID F1", "ID top", "OOD top"):
        assert column in header
    for row in ROWS:
        assert any(line.startswith(f"| {row} |") for line in table.splitlines()), row
    assert "## The paper's claims here" in table
    for claim in ("1. GAD >= SeqKD", "2. GAD keeps", "3. SeqKD higher", "4. GAD mode", "5. frozen"):
        assert claim in table
    png = (out / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
