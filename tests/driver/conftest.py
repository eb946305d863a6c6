import os

import pytest

from tests.config_builder import make_config, tiny_run

# Actors inherit the environment Ray was started with: a teacher key must be set before.
TEACHER_KEY_ENV = "GAD_TEST_TEACHER_KEY"
os.environ.setdefault(TEACHER_KEY_ENV, "sk-test-outage")


@pytest.fixture
def make_cfg(tmp_path):
    """The tiny run (:func:`tests.config_builder.tiny_run`) in this test's ``tmp_path/run``."""

    def make(*extra: str, run_dir=None):
        return make_config(*tiny_run(run_dir or tmp_path / "run", *extra))

    return make
