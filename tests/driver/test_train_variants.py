"""The driver end to end with the other role layouts and backends, each against the default run
(1 rank per role, FSDP2 learners, vLLM rollout) of the same config."""

import math

import pytest

from gad_ray.driver.driver import train
from gad_ray.models.loading import resolve_model_path
from tests.config_builder import make_config, tiny_run

from .helpers import (
    assert_finite,
    assert_same_records,
    event_records,
    exported_weights,
    step_records,
)

# G's warmup step (SFT on the teacher's responses) does not depend on the rollout.
G_WARMUP_KEYS = ("g_loss", "g_grad_norm", "g_lr")


@pytest.fixture(scope="module")
def default_run(ray_session, tmp_path_factory):
    return train(make_config(*tiny_run(tmp_path_factory.mktemp("default") / "run")))


def run(tmp_path, *extra: str):
    return train(make_config(*tiny_run(tmp_path / "run", *extra)))


def check_complete_run(run_dir) -> None:
    """All stages ran with finite metrics, the evals were logged, and the exported student's
    weights moved away from the initial model's."""
    steps = step_records(run_dir)
    assert [r["stage"] for r in steps] == ["warmup", "warmup", "gad", "gad"]
    assert_finite(steps)
    for r in steps:
        keys = ("g_loss", "d_loss") if r["stage"] == "warmup" else ("g_pg_loss", "g_kl", "d_loss")
        assert all(k in r for k in keys), (r["step"], keys)
    assert [e["event"] for e in event_records(run_dir)] == [
        "before_warmup",
        "after_warmup",
        "final",
    ]
    start = exported_weights(resolve_model_path("tiny:tiny"))
    final = exported_weights(run_dir / "final")
    assert sorted(final) == sorted(start)
    moved = max((final[k] - start[k]).abs().max().item() for k in start)
    assert math.isfinite(moved) and moved > 1e-3


def test_two_ranks_per_role_match_one_rank(default_run, tmp_path):
    """Losses are normalised over the global batch, so 2 ranks per role (fp32) log the same
    metrics as 1 rank."""
    run_dir = run(tmp_path, "learner.generator_ranks=2", "learner.discriminator_ranks=2")
    check_complete_run(run_dir)
    ckpt = run_dir / "checkpoints" / "step_00000004"
    for role in ("generator", "discriminator"):  # each rank saved its state
        assert sorted(p.name for p in (ckpt / role).glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    # the micro-batches differ with the split, so their padding does too (and only that)
    two, one = split_free(step_records(run_dir)), split_free(step_records(default_run))
    assert_same_records(two, one, rel=1e-4, abs_tol=1e-5)
    assert all(r[k] >= 1.0 for r in step_records(run_dir) for k in r if k.endswith("pad_ratio"))
    # the evals' D scores too are summed in another order
    assert_same_records(event_records(run_dir), event_records(default_run), rel=1e-4, abs_tol=1e-5)


def split_free(records: list[dict]) -> list[dict]:
    """The records without ``*pad_ratio``, which depends on how rows split into micro-batches."""
    return [{k: v for k, v in r.items() if not k.endswith("pad_ratio")} for r in records]


def test_deepspeed_learners_match_fsdp(default_run, tmp_path):
    """ZeRO-3 learners (fp32 on CPU) log the same metrics as FSDP2 ones."""
    run_dir = run(tmp_path, "learner=deepspeed")
    check_complete_run(run_dir)
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert all((ckpt / role / "deepspeed").is_dir() for role in ("generator", "discriminator"))
    assert_same_records(step_records(run_dir), step_records(default_run), rel=1e-4, abs_tol=1e-5)
    assert_same_records(event_records(run_dir), event_records(default_run), rel=1e-4, abs_tol=1e-5)


def test_hf_rollout(default_run, tmp_path):
    """HF ``generate`` samples differently from vLLM, but G's warmup does not depend on the
    samples, and the greedy evals of equal weights are equal."""
    run_dir = run(tmp_path, "rollout=hf")
    check_complete_run(run_dir)
    steps, default = step_records(run_dir), step_records(default_run)
    assert steps[0]["d_loss"] != default[0]["d_loss"]  # D saw other samples: HF's sampler ran
    for r, d in zip(steps[:2], default[:2], strict=True):
        for key in G_WARMUP_KEYS:
            assert r[key] == pytest.approx(d[key], rel=1e-5, abs=1e-6), (r["step"], key)
    # D trained on other samples, so only its scores in the eval samples differ
    assert_same_records(
        without_d(event_records(run_dir)[:2]), without_d(event_records(default_run)[:2])
    )


def without_d(events: list[dict]) -> list[dict]:
    """Eval events with D's scores dropped from their samples."""
    drop = ("d_student", "d_teacher")
    return [
        e | {"samples": [{k: v for k, v in s.items() if k not in drop} for s in e["samples"]]}
        if "samples" in e
        else e
        for e in events
    ]


def test_sleep_when_idle_is_a_noop_on_cpu(default_run, tmp_path):
    """The sleep / wake / sync order runs (vLLM sleep mode is unavailable on CPU): the run logs
    its sleeps and the same metrics as the default run."""
    run_dir = run(tmp_path, "rollout.sleep_when_idle=true")
    check_complete_run(run_dir)
    steps = step_records(run_dir)
    assert all("time/sleep" in r for r in steps)
    assert_same_records(steps, step_records(default_run))
    assert_same_records(event_records(run_dir), event_records(default_run))
