"""End-to-end runs of the driver on CPU: real Ray, real vLLM, real gloo learners."""

import shutil

import pytest

from gad_ray import recipes
from gad_ray.driver.driver import train
from gad_ray.driver.metrics import read_metrics
from tests.config_builder import make_config, tiny_run

from .helpers import (
    assert_same_records,
    checkpoint_state,
    event_records,
    exported_weights,
    max_abs_diff,
    max_rel_diff,
    model_weights,
    step_records,
)


def test_gad_runs_warmup_then_gad_and_exports(ray_session, make_cfg):
    cfg = make_cfg("algorithm.warmup.generator_lr=3e-3")
    run_dir = train(cfg)
    steps = step_records(run_dir)
    assert [r["stage"] for r in steps] == ["warmup", "warmup", "gad", "gad"]
    lr = cfg.algorithm.generator_optim.lr  # the SFT warmup has its own LR, GAD the optimizer's
    assert [r["g_lr"] for r in steps] == pytest.approx([3e-3, 3e-3, lr, lr])
    warm, gad = steps[0], steps[-1]
    for key in (
        "d_loss",
        "d_acc",
        "g_loss",
        "response_len_mean",
        "len_ratio",
        "truncation_rate",
        "time/generate",
        "time/d_update",
        "time/g_update",
    ):
        assert key in warm, key
    for key in (
        "reward_mean",
        "reward_std",
        "adv_mean",
        "d_loss",
        "d_acc",
        "d_teacher_score_mean",
        "d_student_score_mean",
        "g_pg_loss",
        "g_pg_clipfrac",
        "g_kl",
        "g_entropy",
        "g_grad_norm",
        "d_grad_norm",
        "g_pad_ratio",
        "d_pad_ratio",
        "time/score",
        "time/weight_sync",
        "gen_tokens_per_s",
    ):
        assert key in gad, key
    assert abs(gad["adv_mean"]) < 1e-5  # GRPO advantages are centred per group
    assert gad["g_pad_ratio"] >= 1.0 and gad["d_pad_ratio"] >= 1.0  # computed / real tokens
    for r in steps[2:]:  # the reward is D's score of the samples before D's update
        assert r["reward_mean"] == pytest.approx(r["d_student_score_mean"], rel=1e-5, abs=1e-6)
    d = [model_weights(run_dir / "checkpoints" / f"step_{s:08d}" / "discriminator") for s in (2, 4)]
    assert max_abs_diff(*d) > 1e-6  # D keeps learning in the GAD stage
    events = {r["event"] for r in read_metrics(run_dir / "metrics.jsonl") if "event" in r}
    assert events == {"before_warmup", "after_warmup", "final"}
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "plot.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "step_00000004" / "trainer_state.json").is_file()
    assert "api_key" not in (run_dir / "config.yaml").read_text().replace("api_key_env", "")


def test_seqkd_trains_the_generator_only(ray_session, make_cfg):
    cfg = make_cfg("algorithm=seqkd", "algorithm.warmup.epochs=1")
    assert [(s.name, s.steps) for s in recipes.build(cfg, 4).stages] == [("warmup", 4)]
    run_dir = train(cfg)
    steps = step_records(run_dir)
    assert len(steps) == 4 and all(r["stage"] == "warmup" for r in steps)
    assert all("d_loss" not in r and "g_loss" in r for r in steps)
    assert not (run_dir / "checkpoints" / "step_00000004" / "discriminator").exists()


def test_frozen_discriminator_keeps_its_warmup_weights(ray_session, make_cfg):
    run_dir = train(
        make_cfg("algorithm=gad_frozen_d", "trainer.save_every=1", "trainer.keep_last=9")
    )
    steps = step_records(run_dir)
    assert [r["stage"] for r in steps] == ["warmup", "warmup", "gad", "gad"]
    gad = steps[2:]
    assert all("time/d_update" not in r and "d_grad_norm" not in r for r in gad)
    assert all("d_acc" in r for r in gad)  # the hacking signal is logged
    for r in gad:  # the reward is D's score of the student samples
        assert r["reward_mean"] == pytest.approx(r["d_student_score_mean"], rel=1e-5, abs=1e-6)
    ckpt = run_dir / "checkpoints"
    d = {s: model_weights(ckpt / f"step_{s:08d}" / "discriminator") for s in (1, 2, 4)}
    assert max_abs_diff(d[1], d[2]) > 1e-6  # D learns in warmup...
    assert max_abs_diff(d[2], d[4]) == 0.0  # ...and the GAD stage leaves it exactly as it was
    g = {s: model_weights(ckpt / f"step_{s:08d}" / "generator") for s in (2, 4)}
    assert max_abs_diff(g[2], g[4]) > 1e-6  # while G trains on its reward


def test_warmup_ablations_and_d_only_steps(ray_session, make_cfg):
    run_dir = train(make_cfg("algorithm.warmup.generator=false", "algorithm.gad.d_only_steps=1"))
    steps = step_records(run_dir)
    assert all("g_loss" not in r for r in steps if r["stage"] == "warmup")
    gad = [r for r in steps if r["stage"] == "gad"]
    assert "g_pg_loss" not in gad[0] and "g_pg_loss" in gad[1]  # first GAD step: D only
    # the authors' warmup: its first k steps update D only, then D and G
    steps = step_records(
        train(make_cfg("algorithm.warmup.d_only_steps=1", run_dir=run_dir.parent / "w"))
    )
    warm = [r for r in steps if r["stage"] == "warmup"]
    assert "d_loss" in warm[0] and "g_loss" not in warm[0]
    assert "d_loss" in warm[1] and "g_loss" in warm[1]


# 2 warmup + 3 GAD steps, a checkpoint after each; cosine LR schedules (a lost schedule shows
# in g_lr / d_lr) and a GAD-stage LR for G that differs from its warmup LR.
RESUME = (
    "algorithm.gad.steps=3",
    "trainer.save_every=1",
    "trainer.keep_last=9",
    "algorithm.generator_optim.schedule=cosine",
    "algorithm.discriminator_optim.schedule=cosine",
    "algorithm.generator_optim.lr=3e-4",
)
TOTAL = 5


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    return train(make_config(*tiny_run(tmp_path_factory.mktemp("uninterrupted") / "run", *RESUME)))


@pytest.mark.parametrize("stop", [2, 3], ids=["at-warmup-gad-boundary", "mid-gad"])
def test_resumed_run_equals_the_uninterrupted_run(uninterrupted, tmp_path, stop):
    """A run that died after its checkpoint at ``stop`` (and had logged later steps) is
    resumed: every step and eval logs the same metrics as the uninterrupted run, and the
    exported student and both learners' final checkpoints (weights, Adam moments, the KL
    reference) are the same."""
    run_dir = tmp_path / "run"
    ckpt = f"checkpoints/step_{stop:08d}"
    shutil.copytree(uninterrupted / ckpt, run_dir / ckpt)
    shutil.copy(uninterrupted / "metrics.jsonl", run_dir / "metrics.jsonl")  # incl. later steps
    resumed = train(make_config(*tiny_run(run_dir, *RESUME)))

    steps = step_records(resumed)
    assert [r["step"] for r in steps] == list(range(TOTAL))  # each step once
    assert [r["stage"] for r in steps] == ["warmup"] * 2 + ["gad"] * 3
    assert all("g_kl" in r and "g_lr" in r and "d_lr" in r for r in steps[2:])
    assert_same_records(steps, step_records(uninterrupted))
    assert_same_records(event_records(resumed), event_records(uninterrupted))

    final = max_rel_diff(
        exported_weights(resumed / "final"), exported_weights(uninterrupted / "final")
    )
    assert final < 1e-5
    last = f"checkpoints/step_{TOTAL:08d}"
    for role in ("generator", "discriminator"):
        a = checkpoint_state(resumed / last / role)
        b = checkpoint_state(uninterrupted / last / role)
        assert any(k.startswith("optim/state/") for k in b)
        assert max_rel_diff(a, b) < 1e-5, role
