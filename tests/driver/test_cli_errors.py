"""A catalogue of input mistakes: each stops ``gad-train`` before Ray or any actor starts, in
seconds, with its message alone (no traceback) and exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_gpu_check import HIDE_PACKAGES
from tests.config_builder import tiny_run

GAD_TRAIN = str(Path(sys.executable).parent / "gad-train")

CATALOGUE = {
    "missing data file": (
        ["data.train_path=/nonexistent/train.jsonl"],
        "data file '/nonexistent/train.jsonl' does not exist",
    ),
    "missing model directory": (
        ["model.student.path=/nonexistent/model"],
        "model spec '/nonexistent/model': directory '/nonexistent/model' does not exist",
    ),
    "missing API key variable": (
        [
            "teacher=api",
            "teacher.api.base_url=http://127.0.0.1:9/v1",
            "teacher.api.model=m",
            "teacher.api.api_key_env=GAD_TEST_NO_SUCH_KEY",
        ],
        "no teacher API key: environment variable GAD_TEST_NO_SUCH_KEY is not set",
    ),
    "invalid resume target": (
        ["trainer.resume=/nonexistent/step_00000010"],
        "trainer.resume='/nonexistent/step_00000010': not a complete checkpoint",
    ),
    "run dir that cannot be written": (
        ["trainer.run_dir=/proc/gad-ray-run"],
        "trainer.run_dir='/proc/gad-ray-run': cannot write the run directory",
    ),
    "unknown algorithm": (["algorithm.name=gan"], "algorithm.name='gan': no such algorithm"),
    "DeepSpeed not installed": (
        ["learner=deepspeed"],
        "learner.backend=deepspeed needs the deepspeed package, which is not installed",
    ),
}


@pytest.mark.parametrize("mistake", list(CATALOGUE))
def test_input_mistakes_fail_before_any_actor_without_a_traceback(mistake, tmp_path):
    overrides, message = CATALOGUE[mistake]
    ray_tmp = tmp_path / "ray"
    env = os.environ | {"RAY_TMPDIR": str(ray_tmp), "HYDRA_FULL_ERROR": "0"}
    if mistake == "DeepSpeed not installed":  # fault injection: hide the package
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HIDE_PACKAGES)
        env |= {"GAD_HIDE_PACKAGES": "deepspeed", "PYTHONPATH": str(hook)}
    args = [
        a
        for a in tiny_run(tmp_path / "run")
        if a.split("=")[0] not in {o.split("=")[0] for o in overrides}
    ]
    proc = subprocess.run(
        [GAD_TRAIN, *args, *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not ray_tmp.exists() or not any(ray_tmp.rglob("session_*"))  # Ray never started
