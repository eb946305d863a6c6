"""bench/pipeline.py's pipeline model and critical path, against hand-computed step times."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "bench_pipeline", Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"
)
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)

PHASES = {"generate": 4.0, "weight_sync": 1.0, "score": 2.0, "d_update": 3.0, "g_update": 5.0}


def test_critical_path_is_the_longer_of_rollout_and_learners():
    # rollout 4 + 1 = 5; learners 2 + 3 + 5 = 10 in turn, 2 + max(3, 5) = 7 together
    assert pipeline.critical_path(PHASES, d_g_together=False) == 10.0
    assert pipeline.critical_path(PHASES, d_g_together=True) == 7.0
    slow_rollout = PHASES | {"generate": 9.0}
    assert pipeline.critical_path(slow_rollout, d_g_together=True) == 10.0


@pytest.mark.parametrize(
    ("mode", "separate", "want"),
    [
        ("sync", True, 4 + 1 + 2 + 3 + 5),  # everything in turn
        ("overlap_d_g", True, 4 + 1 + 2 + 5),  # D || G: the longer update
        ("overlap_d_g", False, 4 + 1 + 2 + 3 + 5),  # shared cores: no gain
        ("one_step_off", True, max(4, 2 + 5) + 1),  # generation hides behind training
        ("one_step_off", False, max(4, 2 + 3 + 5) + 1),
    ],
)
def test_project_step_seconds(mode, separate, want):
    assert pipeline.project(PHASES, mode, separate) == want


def test_summarize_takes_the_ratio_per_step():
    """Steps of different lengths: the median of per-step ratios, not of step over path."""
    rows = [
        {
            "s_per_step": 11.0,
            "response_len_mean": 4.0,
            **{f"time/{k}": v for k, v in PHASES.items()},
        },
        {
            "s_per_step": 30.0,
            "response_len_mean": 8.0,
            **{f"time/{k}": 2 * v for k, v in PHASES.items()},
        },
        {
            "s_per_step": 21.0,
            "response_len_mean": 6.0,
            **{f"time/{k}": 3 * v for k, v in PHASES.items()},
        },
    ]
    out = pipeline.summarize(rows, d_g_together=False)  # paths 10, 20, 30: ratios 1.1, 1.5, 0.7
    assert out["critical"] == 20.0 and out["step"] == 21.0 and out["response_len"] == 6.0
    assert out["ratio"] == pytest.approx(1.1)
