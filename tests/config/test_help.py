"""``--help`` of each command says what it does, its main keys and an example (the Hydra help
templates in gad_ray/conf/hydra/help/), instead of Hydra's generic text and the whole config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _help(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("script", "flag", "what", "keys"),
    [
        (
            "gad-train",
            "--help",
            "distil a black-box teacher LLM into an open student",
            ["experiment=", "data.train_path=", "trainer.run_dir=", "plan_only=true"],
        ),
        (
            "gad-fetch",
            "-h",
            "fill a prompt file with the teacher's responses",
            ["teacher.api.base_url=", "teacher.api.model=", "fetch.output="],
        ),
        (
            "gad-eval",
            "--help",
            "score students against the teacher",
            ["eval.models=", "eval.sets=", "eval.judge.model="],
        ),
    ],
)
def test_each_command_has_its_own_help(script, flag, what, keys, tmp_path):
    text = _help([str(BIN / script), flag], tmp_path)
    assert text.startswith(f"{script}: {what}")
    assert "Main keys:" in text and "Example" in text
    for key in keys:
        assert key in text, key
    assert f"  {script} " in text  # an example command line
    assert "Powered by Hydra" not in text  # not Hydra's generic page...
    assert "len_ratio_max" not in text  # ...nor the 250-line config
    assert not (tmp_path / "outputs").exists()  # help starts nothing, writes nothing


def test_train_help_lists_the_config_groups(tmp_path):
    text = _help([str(BIN / "gad-train"), "--help"], tmp_path)
    groups = dict(
        line.split(": ", 1) for line in text.splitlines() if line.startswith("experiment: ")
    )
    assert "qwen2.5-7b_gpt5chat" in groups["experiment"]
    assert "tiny_cpu" in groups["experiment"]


def test_a_normal_run_ignores_the_help_override(tmp_path):
    # --cfg job without --help: no hydra/help override is added, the config is composed as usual
    text = _help([str(BIN / "gad-train"), "--cfg", "job", "name=x"], tmp_path)
    assert text.startswith("name: x")


def test_demo_takes_help(tmp_path):
    text = _help([sys.executable, "-m", "gad_ray.demo", "--help"], tmp_path)
    assert text.startswith("usage: python -m gad_ray.demo")
    assert "synthetic teacher" in text and "example: python -m gad_ray.demo" in text
    assert not (tmp_path / "outputs").exists()  # no run started
