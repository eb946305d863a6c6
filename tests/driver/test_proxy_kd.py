"""Proxy-KD end to end on CPU: real Ray, real vLLM, real gloo learners; a 3-layer proxy and the
2-layer ``tiny`` student sharing the tiny tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gad_ray import recipes
from gad_ray.driver.driver import Driver, train
from gad_ray.driver.metrics import read_metrics
from gad_ray.hydra_app import compose
from gad_ray.models.loading import ModelLoadError
from gad_ray.models.tiny import build_tiny_model, build_tokenizer, model_config
from gad_ray.recipes.proxy_kd import slices

STAGES = ["proxy_sft"] * 2 + ["proxy_dpo"] * 2 + ["student_kd"] * 4


def overrides(run_dir, models, *extra: str) -> list[str]:
    """16 prompts, 2 per step: 2 proxy SFT steps, 2 DPO iterations of 1 step, 4 student steps."""
    return [
        "algorithm=proxy_kd",
        "model=tiny",
        f"model.student.path={models[0]}",
        f"algorithm.proxy_kd.proxy.path={models[1]}",
        "algorithm.proxy_kd.sft_fraction=0.2",
        "algorithm.proxy_kd.dpo_fraction=0.25",
        "algorithm.proxy_kd.dpo_iterations=2",
        "algorithm.proxy_kd.top_k=5",
        "algorithm.proxy_kd.proxy_optim.lr=0.001",
        "algorithm.generator_optim.lr=0.001",
        "data.train_path='synthetic:train?n=16&seed=0'",
        "data.eval_path='synthetic:eval?n=4&seed=1'",
        "data.max_prompt_length=64",
        "data.max_response_length=12",
        "data.prompts_per_step=2",
        "learner.micro_batch_size=2",
        "rollout.kv_cache_memory_bytes=33554432",
        "trainer.save_every=2",
        "trainer.tensorboard=false",
        f"trainer.run_dir={run_dir}",
        *extra,
    ]


def build_proxy(out):
    """A random 3-layer proxy (the student ``tiny`` has 2) with the shared tiny tokenizer."""
    tok = build_tokenizer()
    config = model_config("tiny", "qwen2", tok)
    config.num_hidden_layers, config.layer_types = 3, ["full_attention"] * 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _steps(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(student, proxy) directories built here, so both carry today's tiny tokenizer."""
    student = build_tiny_model(tmp_path_factory.mktemp("student"), size="tiny")
    return student, build_proxy(tmp_path_factory.mktemp("proxy"))


@pytest.fixture(scope="module")
def full_run(ray_session, models, tmp_path_factory):
    return train(compose(overrides(tmp_path_factory.mktemp("full") / "run", models)))


def test_stages_slice_the_data_by_the_fractions(models, tmp_path):
    cfg = compose(overrides(tmp_path, models))
    assert slices(cfg, 8) == (2, 1, 4)  # SFT steps, steps per DPO iteration, student steps
    stages = recipes.build(cfg, 8).stages
    assert [s.name for s in stages for _ in range(s.steps)] == STAGES
    assert [s.roles for s in stages] == [("proxy",)] + [("proxy", "proxy_rollout")] * 2 + [
        ("proxy_frozen", "generator", "rollout")
    ]
    with pytest.raises(Exception, match=r"3 steps of data.prompts_per_step=2 .* leaving 0"):
        slices(cfg, 3)


def test_tokenizer_mismatch_is_a_clear_error(models, tmp_path):
    other = build_tiny_model(tmp_path / "other", size="tiny")
    tok = build_tokenizer()
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    cfg = compose(overrides(tmp_path / "run", (models[0], other)))
    with pytest.raises(
        ModelLoadError,
        match=r"student \(model.student.path='.*student\d*'\) and "
        r"proxy \(algorithm.proxy_kd.proxy.path=.*other'\) tokenizers differ",
    ):
        Driver(cfg)


def test_three_stages_log_their_metrics_and_export(full_run):
    steps = _steps(full_run)
    assert [r["stage"] for r in steps] == STAGES
    sft, dpo, student = steps[0], steps[2:4], steps[4:]
    assert "proxy_loss" in sft and "proxy_grad_norm" in sft
    for r, iteration in zip(dpo, (1, 2), strict=True):
        assert r["dpo_iteration"] == iteration
        for key in (
            "proxy_dpo_loss",
            "proxy_reward_margin",
            "proxy_reward_accuracy",
            "proxy_teacher_loglik",
            "proxy_iteration_teacher_loglik",
            "response_len_mean",
            "time/generate",
            "time/weight_sync",
        ):
            assert key in r, key
        assert r["proxy_reward_margin"] == pytest.approx(0, abs=1e-6)  # 1st step of an iteration
    for r in student:
        for key in ("g_ce", "g_kd", "g_loss", "g_grad_norm", "w_mean", "w_std", "w_p50"):
            assert key in r, key
        assert 0 < r["w_min"] <= r["w_p50"] <= r["w_max"] < 1
        assert r["g_loss"] == pytest.approx(r["g_ce"] + r["g_kd"], rel=1e-5)  # alpha = 1
        assert r["g_kd"] > 0 and r["g_grad_norm"] > 0
    events = {r["event"] for r in read_metrics(full_run / "metrics.jsonl") if "event" in r}
    assert events == {"before_distill", "final"}
    assert (full_run / "proxy" / "config.json").is_file()
    assert (full_run / "final" / "config.json").is_file()
    last = full_run / "checkpoints" / "step_00000008"
    assert (last / "generator").is_dir() and not (last / "proxy").exists()


def test_resume_across_stage_boundaries_equals_an_uninterrupted_run(full_run, models, tmp_path):
    cfg = compose(overrides(tmp_path / "part", models))
    for stop in (3, 6):  # in DPO iteration 1 (proxy state), then inside the student stage
        driver = Driver(cfg)
        try:
            driver.fit(stop_at=stop)
        finally:
            driver.shutdown()
        assert _steps(tmp_path / "part")[-1]["step"] == stop - 1
    ckpt = tmp_path / "part" / "checkpoints"
    assert (ckpt / "step_00000004" / "generator").is_dir()
    resumed = train(cfg)
    a, b = _steps(full_run), _steps(resumed)
    assert [r["step"] for r in b] == list(range(8))
    for ra, rb in zip(a, b, strict=True):
        for key in (
            "proxy_loss",
            "proxy_dpo_loss",
            "proxy_chosen_logp",
            "proxy_iteration_teacher_loglik",
            "response_len_mean",
            "g_ce",
            "g_kd",
            "w_mean",
            "w_std",
        ):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    state = json.loads((ckpt / "step_00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8
