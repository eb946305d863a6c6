"""D || G updates and the one-step-off pipeline, end to end on CPU (real Ray, vLLM, gloo)."""

import dataclasses

import pytest
import torch

from gad_ray.driver.driver import Driver, train
from tests.config_builder import make_config, tiny_run

from .helpers import assert_same_records, step_records


@pytest.fixture(scope="module")
def sync_run(ray_session, tmp_path_factory):
    run = tmp_path_factory.mktemp("sync") / "run"
    return train(make_config(*tiny_run(run, "trainer.overlap_d_g=false")))


def test_d_and_g_in_parallel_give_the_sequential_metrics(sync_run, make_cfg, tmp_path):
    # colocated memory hygiene runs its path too (a no-op on CPU): vLLM sleeps after each
    # generation, and each learner waits offloaded outside its own update
    overlap = train(
        make_cfg(
            "trainer.overlap_d_g=true", "rollout.sleep_when_idle=true", "learner.offload_idle=true"
        )
    )
    a, b = step_records(sync_run), step_records(overlap)
    assert_same_records(a, b)
    gad = [r for r in b if r["stage"] == "gad"]
    assert all("time/d_update" in r and "time/g_update" in r for r in gad)
    assert all(r["rollout_staleness"] == 0 for r in a + b)
    # peak memory per phase per role (the process RSS on CPU)
    for key in (
        "mem/rollout/generate_peak_gb",
        "mem/discriminator/score_peak_gb",
        "mem/discriminator/d_update_peak_gb",
        "mem/generator/g_update_peak_gb",
        "mem/generator/weight_sync_peak_gb",
    ):
        assert 0.1 < gad[-1][key] < 20, key


def test_rollout_and_learner_logprobs_agree_in_a_sync_run(sync_run, off_run):
    """``g_logprob_gap``, every GAD step: the mean |learner - rollout| log-prob of the samples'
    tokens. In sync the rollout holds the weights being trained and both sides compute fp32 on
    CPU, so only kernel rounding remains (per token ~1e-6; the rollout tests' bound is 1e-4): the
    mean stays below 1e-4, where a penalty or a wrong temperature would give > 1e-2. One step
    off, the rollout's weights are one update (lr 1e-2) older: the gap measures that too."""
    sync = [r for r in step_records(sync_run) if r["stage"] == "gad"]
    assert len(sync) == 2 and all(0 <= r["g_logprob_gap"] < 1e-4 for r in sync)
    off = [r for r in step_records(off_run) if r["stage"] == "gad"]
    assert len(off) == 3 and all(r["g_logprob_gap"] > 1e-3 for r in off)


def test_g_trains_at_the_temperature_its_stage_samples_at(ray_session, make_cfg):
    """The recipe's stages sample at T = 0.5 while ``algorithm.grpo.temperature`` stays 0.8: G's
    update computes its log-probs at the samples' 0.5, so in a sync run they equal the rollout's
    (``g_logprob_gap`` < 1e-4, where log-probs at 0.8 would give far more)."""
    cfg = make_cfg("trainer.overlap_d_g=false")
    driver = Driver(cfg)
    try:
        for stage in driver.stages:
            if stage.sampling is not None:
                params = dataclasses.replace(stage.sampling.params, temperature=0.5)
                stage.sampling = dataclasses.replace(stage.sampling, params=params)
        run_dir = driver.fit()
    finally:
        driver.shutdown()
    assert cfg.algorithm.grpo.temperature == 0.8
    gad = [r for r in step_records(run_dir) if r["stage"] == "gad"]
    assert len(gad) == 2 and all(0 <= r["g_logprob_gap"] < 1e-4 for r in gad)


OFF = ("trainer.pipeline=one_step_off", "algorithm.generator_optim.lr=1e-2", "trainer.save_every=1")


@pytest.fixture(scope="module")
def off_run(ray_session, tmp_path_factory):
    run = tmp_path_factory.mktemp("off") / "run"
    return train(make_config(*tiny_run(run, *OFF, "algorithm.gad.steps=3")))


def test_one_step_off_trains_on_one_step_stale_samples_with_real_ppo_ratios(off_run):
    steps = step_records(off_run)
    assert [r["stage"] for r in steps] == ["warmup"] * 2 + ["gad"] * 3
    # step 0's samples come from the initial weights; every later step's from the weights
    # one update older than the policy that trains on them
    assert [r["rollout_staleness"] for r in steps] == [0, 1, 1, 1, 1]
    gad = [r for r in steps if r["stage"] == "gad"]
    # old log-probs are the rollout's (the sampling policy's), so the ratio departs from 1
    assert all(abs(r["g_approx_kl"]) > 1e-6 for r in gad)
    assert max(r["g_pg_clipfrac"] for r in gad) > 0
    assert all(r["time/generate"] > 0 for r in steps)


def test_one_step_off_resumes_mid_pipeline_like_an_uninterrupted_run(off_run, make_cfg):
    """A checkpoint taken while the next step's samples are in flight saves them; the resumed
    run trains on exactly those samples, so every later step equals the uninterrupted run's."""
    cfg = make_cfg(*OFF, "algorithm.gad.steps=3")
    driver = Driver(cfg)
    try:
        driver.fit(stop_at=3)
    finally:
        driver.shutdown()
    ckpt = cfg.trainer.run_dir
    saved = torch.load(f"{ckpt}/checkpoints/step_00000003/pending_samples.pt", weights_only=False)
    assert saved["step"] == 3 and saved["staleness"] == 1 and saved["samples"]
    resumed = train(cfg)
    assert_same_records(step_records(off_run), step_records(resumed))
