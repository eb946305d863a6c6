"""bench/toy_modes.py: on the same teacher samples, SeqKD covers the three modes (mass in the
valleys, less than the teacher's on the top mode) and GAD seeks the top mode."""

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.toy_modes import WEIGHTS, ToyConfig, main, mode_masses, run, teacher_probs  # noqa: E402


def test_teacher_has_three_separated_modes() -> None:
    p = teacher_probs()
    assert abs(float(p.sum()) - 1.0) < 1e-9
    masses = mode_masses(p)
    for i, w in enumerate(WEIGHTS):
        assert abs(masses[f"mode{i + 1}"] - w) < 0.02
    assert masses["valley"] < 0.03


def test_seqkd_covers_and_gad_seeks_the_top_mode() -> None:
    torch.set_num_threads(1)
    result = run(3, ToyConfig())
    teacher_top = result["teacher"]["mode1"]
    for seed in result["seeds"]:
        seqkd = seed["masses"]["seqkd"]
        assert seqkd["mode1"] < teacher_top - 0.15 and seqkd["valley"] > 0.25, seqkd
    gad_top = statistics.median(s["masses"]["gad"]["mode1"] for s in result["seeds"])
    assert gad_top > teacher_top + 0.2, result["seeds"]


def test_cli_writes_table_and_figure(tmp_path) -> None:
    main(["--out", str(tmp_path), "--seeds", "1", "--steps", "40", "--warmup", "20"])
    assert "| gad |" in (tmp_path / "toy_modes.md").read_text()
    assert (tmp_path / "toy_modes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "toy_modes.json").is_file()
