"""End-to-end runs of the driver on CPU: real Ray, real vLLM, real gloo learners."""

import json

import pytest

from gad_ray import recipes
from gad_ray.driver.driver import Driver, train
from gad_ray.driver.metrics import read_metrics


def _steps(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]


def test_gad_runs_warmup_then_gad_and_exports(ray_session, make_cfg):
    cfg = make_cfg("algorithm.warmup.generator_lr=3e-3")
    run_dir = train(cfg)
    steps = _steps(run_dir)
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
        "time/score",
        "time/weight_sync",
        "gen_tokens_per_s",
    ):
        assert key in gad, key
    assert abs(gad["adv_mean"]) < 1e-5  # GRPO advantages are centred per group
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
    steps = _steps(run_dir)
    assert len(steps) == 4 and all(r["stage"] == "warmup" for r in steps)
    assert all("d_loss" not in r and "g_loss" in r for r in steps)
    assert not (run_dir / "checkpoints" / "step_00000004" / "discriminator").exists()


def test_frozen_discriminator_is_not_updated_in_gad(ray_session, make_cfg):
    run_dir = train(make_cfg("algorithm=gad_frozen_d"))
    gad = [r for r in _steps(run_dir) if r["stage"] == "gad"]
    assert gad and all("time/d_update" not in r and "d_grad_norm" not in r for r in gad)
    assert all("d_acc" in r and "reward_mean" in r for r in gad)  # the hacking signal is logged


def test_warmup_ablations_and_d_only_steps(ray_session, make_cfg):
    run_dir = train(make_cfg("algorithm.warmup.generator=false", "algorithm.gad.d_only_steps=1"))
    steps = _steps(run_dir)
    assert all("g_loss" not in r for r in steps if r["stage"] == "warmup")
    gad = [r for r in steps if r["stage"] == "gad"]
    assert "g_pg_loss" not in gad[0] and "g_pg_loss" in gad[1]  # first GAD step: D only
    # the authors' warmup: its first k steps update D only, then D and G
    steps = _steps(train(make_cfg("algorithm.warmup.d_only_steps=1", run_dir=run_dir.parent / "w")))
    warm = [r for r in steps if r["stage"] == "warmup"]
    assert "d_loss" in warm[0] and "g_loss" not in warm[0]
    assert "d_loss" in warm[1] and "g_loss" in warm[1]


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(ray_session, make_cfg, tmp_path):
    full = train(make_cfg("trainer.save_every=1", run_dir=tmp_path / "full"))
    # Interrupted run: stop after 3 steps (crossing the warmup/GAD boundary), then resume.
    part_cfg = make_cfg("trainer.save_every=1", run_dir=tmp_path / "part")
    driver = Driver(part_cfg)
    try:
        driver.fit(stop_at=3)
    finally:
        driver.shutdown()
    assert _steps(tmp_path / "part")[-1]["step"] == 2
    resumed = train(part_cfg)
    a, b = _steps(full), _steps(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in ("d_loss", "d_acc", "g_loss", "reward_mean", "g_pg_loss", "response_len_mean"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    state = json.loads(
        (resumed / "checkpoints" / "step_00000004" / "trainer_state.json").read_text()
    )
    assert state["step"] == 4
