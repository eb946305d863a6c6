"""Shared pytest fixtures."""

from pathlib import Path

import pytest

from gad_ray.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` random Qwen2 (+ tokenizer) saved once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), size="tiny", arch="qwen2")


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `small` random Qwen2 (~15M params), built only by tests that ask for it."""
    return build_tiny_model(tmp_path_factory.mktemp("small-qwen2"), size="small", arch="qwen2")
