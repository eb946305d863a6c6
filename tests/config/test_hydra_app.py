"""The console scripts are Hydra apps: --cfg job, overrides, --multirun, and named config errors."""

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / script), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cfg_job_prints_the_tiny_cpu_config(tmp_path):
    out = _run("gad-train", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: tiny_cpu" in out.stdout
    assert "path: tiny:small" in out.stdout and "n_samples: 4" in out.stdout


def test_override_is_applied(tmp_path):
    out = _run(
        "gad-train",
        "--cfg",
        "job",
        "algorithm=seqkd",
        "algorithm.generator_optim.lr=0.01",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "name: seqkd" in out.stdout and "lr: 0.01" in out.stdout


@pytest.mark.parametrize("override", ["algorithm.grpo.n_sample=8", "+algorithm.grpo.n_sample=8"])
def test_typo_fails_naming_the_key(tmp_path, override):
    out = _run("gad-train", override, cwd=tmp_path)
    assert out.returncode != 0
    assert "algorithm.grpo.n_sample" in out.stderr


def test_impossible_combination_fails_before_anything_starts(tmp_path):
    out = _run("gad-train", "algorithm.grpo.n_samples=1", cwd=tmp_path)
    assert out.returncode == 2
    assert "algorithm.grpo.n_samples=1" in out.stderr


@pytest.mark.parametrize("script", ["gad-train", "gad-fetch", "gad-eval"])
def test_every_entry_point_is_a_validating_hydra_app(tmp_path, script):
    out = _run(script, "data.max_prompt_length=0", cwd=tmp_path)
    assert out.returncode == 2
    assert "config key 'data.max_prompt_length'" in out.stderr


def test_multirun_sweeps_each_value_in_its_own_run_dir(tmp_path):
    out = _run("gad-eval", "--multirun", "seed=1,2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("is valid") == 2
    sweep = tmp_path / "outputs" / "tiny_cpu-sweep"
    assert (sweep / "seed=1").is_dir() and (sweep / "seed=2").is_dir()
