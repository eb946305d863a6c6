import os

import pytest

from gad_ray.config.hydra_app import compose

# Actors inherit the environment Ray was started with: a teacher key must be set before.
TEACHER_KEY_ENV = "GAD_TEST_TEACHER_KEY"
os.environ.setdefault(TEACHER_KEY_ENV, "sk-test-outage")


def tiny_overrides(run_dir, *extra: str) -> list[str]:
    """A GAD run small enough for CPU tests: 4 prompts x 2 samples, 2 warmup + 2 GAD steps."""
    return [
        "model=tiny",
        "data.train_path='synthetic:train?n=16&seed=0'",
        "data.eval_path='synthetic:eval?n=8&seed=1'",
        "data.max_prompt_length=64",
        "data.max_response_length=12",
        "data.prompts_per_step=4",
        "algorithm.grpo.n_samples=2",
        "algorithm.warmup.epochs=0.5",
        "algorithm.warmup.d_only_steps=0",
        "algorithm.gad.steps=2",
        "learner.micro_batch_size=2",
        "rollout.kv_cache_memory_bytes=33554432",
        "trainer.save_every=2",
        "trainer.tensorboard=false",
        f"trainer.run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture
def make_cfg(tmp_path):
    def make(*extra: str, run_dir=None):
        return compose(tiny_overrides(run_dir or tmp_path / "run", *extra))

    return make
