"""trainer.run_dir: made absolute at start; a path in Ray's runtime-env cache is refused."""

import os
from pathlib import Path

import pytest

from gad_ray.config.schema import ConfigError
from gad_ray.hydra_app import compose
from gad_ray.run_dir import check_durable, prepare_run_dir


def test_run_dir_is_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["trainer.run_dir=runs/a"])
    assert cfg.trainer.run_dir == str(tmp_path / "runs" / "a")
    monkeypatch.chdir("/")  # a later chdir does not move it
    assert prepare_run_dir(cfg) == tmp_path / "runs" / "a"
    assert (tmp_path / "runs" / "a" / "config.yaml").is_file()
    home = compose(["trainer.run_dir='~/gad-runs/x'"]).trainer.run_dir
    assert home == os.path.expanduser("~/gad-runs/x")


def test_a_run_dir_in_rays_working_dir_cache_is_refused(tmp_path):
    # what a Ray job's relative run dir becomes: its unpacked working_dir in the session's cache
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1"
    wd = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    run_dir = wd / "outputs" / "tiny_cpu"
    cfg = compose([f"trainer.run_dir={run_dir}"])
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(cfg)
    msg = str(err.value)
    assert msg.startswith(f"trainer.run_dir='{run_dir}' is inside Ray's runtime-env cache")
    assert "RUN_ROOT=/shared/" in msg and "storage every node mounts" in msg
    assert not run_dir.exists()  # nothing written there
    # reached through a symlink (e.g. /tmp/ray/session_latest): refused too
    (tmp_path / "latest").symlink_to(wd, target_is_directory=True)
    with pytest.raises(ConfigError):
        check_durable(tmp_path / "latest" / "outputs")
    # a directory merely named like Ray's, outside a session, is fine
    check_durable(tmp_path / "runtime_resources" / "runs")
    check_durable(Path("/shared/gad-runs/x"))
