"""Failures end the run with a clear message and a resumable checkpoint, never a hang."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from gad_ray.config.schema import ConfigError
from gad_ray.driver.driver import Driver, TrainingAborted, train
from gad_ray.driver.metrics import read_metrics
from gad_ray.synthetic.server import start_server_thread
from tests.config_builder import make_config, tiny_run

from .conftest import TEACHER_KEY_ENV
from .helpers import step_records


def actor_pids(class_name: str) -> list[int]:
    """PIDs of this process's Ray actors of ``class_name`` (Ray titles an actor's process
    ``ray::<class>`` or ``ray::<class>.<method>``); other sessions' actors are not ours."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if re.match(rf"ray::{class_name}(\.|\s|$)", title):
            pids.append(proc.pid)
    return pids


def kill_when_file_appears(path: Path, class_name: str, killed: list[int]) -> None:
    """SIGKILL every actor of ``class_name`` as soon as ``path`` exists (polling; 10 min max)."""
    deadline = time.time() + 600
    while not path.is_file() and time.time() < deadline:
        time.sleep(0.02)
    for pid in actor_pids(class_name):
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def without(text: str, path: Path | str) -> str:
    """``text`` with ``path`` blanked out (a test's tmp dir name must not satisfy a check)."""
    for form in {str(path), str(Path(path).resolve())}:
        text = text.replace(form, "<run_dir>")
    return text


def test_config_errors_are_caught_before_any_actor_starts(make_cfg, no_ray):
    with pytest.raises(ConfigError, match="algorithm.grpo.n_samples=1"):
        make_cfg("algorithm.grpo.n_samples=1")
    assert not ray.is_initialized()


def test_dead_actor_ends_the_run_naming_the_role_and_the_checkpoint(ray_session, make_cfg):
    """With no restarts left (trainer.max_restarts=0) a dead role stops the run."""
    cfg = make_cfg("trainer.save_every=1", "trainer.max_restarts=0")
    driver = Driver(cfg)
    try:
        driver.fit(stop_at=1)
        ray.kill(driver.roles["discriminator"].workers[0])
        with pytest.raises(TrainingAborted) as err:
            driver.fit()
    finally:
        driver.shutdown()
    msg = without(str(err.value), cfg.trainer.run_dir)
    assert "discriminator" in msg and "step_00000001" in msg and "resume=auto" in msg


def test_actor_killed_during_a_step_ends_the_run_then_resume_finishes(ray_session, make_cfg):
    """D's process is SIGKILLed as soon as the step-3 checkpoint is complete, while step 3
    syncs G's weights and samples: step 3 fails when it asks D for rewards, naming the
    discriminator and that checkpoint (no restarts left: trainer.max_restarts=0; the healing
    itself is tests/driver/test_healing.py); a rerun resumes there and finishes."""
    cfg = make_cfg("trainer.save_every=1", "trainer.max_restarts=0")
    run_dir = Path(cfg.trainer.run_dir)
    marker = run_dir / "checkpoints" / "step_00000003" / "trainer_state.json"
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_when_file_appears, args=(marker, "DiscriminatorWorker", killed), daemon=True
    )
    killer.start()
    with pytest.raises(TrainingAborted) as err:
        train(cfg)
    killer.join(timeout=60)
    assert len(killed) == 1  # the one discriminator rank
    msg = without(str(err.value), run_dir)
    assert re.search(r"\bdiscriminator\b", msg), msg
    assert "step_00000003" in msg, msg
    assert [r["step"] for r in step_records(run_dir)] == [0, 1, 2]  # died inside step 3
    train(cfg)
    assert [r["step"] for r in step_records(run_dir)] == [0, 1, 2, 3]


def test_teacher_outage_ends_the_run_with_a_resumable_checkpoint(ray_session, tmp_path):
    server = start_server_thread(api_key=os.environ[TEACHER_KEY_ENV])
    cfg = make_config(
        *tiny_run(
            tmp_path / "run",
            "teacher=api",
            f"teacher.api.base_url={server.base_url}",
            "teacher.api.model=synthetic-teacher",
            "teacher.api.api_key_env=GAD_TEST_TEACHER_KEY",
            "teacher.api.max_retries=1",
            "teacher.api.timeout_s=1",
            "teacher.api.backoff_base_s=0.05",
            "teacher.api.backoff_max_s=0.1",
            "teacher.api.outage_timeout_s=2",
            "teacher.prefetch_batches=0",
            "trainer.save_every=1",
        )
    )
    driver = Driver(cfg)
    try:
        driver.fit(stop_at=1)
        server.stop()  # the API goes away for longer than teacher.api.outage_timeout_s
        t0 = time.time()
        with pytest.raises(TrainingAborted) as err:
            driver.fit()
        assert time.time() - t0 < 60
    finally:
        driver.shutdown()
    msg = without(str(err.value), cfg.trainer.run_dir)  # the tmp dir's name holds "teacher"
    assert re.search(r"\bteacher\b", msg) and "outage_timeout_s=2" in msg, msg
    assert "step_00000001" in msg
    assert os.environ[TEACHER_KEY_ENV] not in str(err.value)


def test_ctrl_c_saves_and_exits_then_resume_finishes(tmp_path):
    """SIGINT as soon as the first step is logged: the step in flight finishes, a checkpoint
    is saved and the process exits 0; a rerun resumes there and finishes. A tiny step takes
    ~0.3 s, so the run has 32 steps: the signal lands long before the last one."""
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "gad-train"),
        *tiny_run(run_dir, "algorithm.gad.steps=30", "trainer.save_every=100"),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any("stage" in r for r in read_metrics(metrics)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    stopped = re.search(r"Interrupted: saved a checkpoint at step (\d+) of 32", out)
    assert stopped, out
    at = int(stopped.group(1))
    assert 0 < at < 32
    assert [r["step"] for r in step_records(run_dir)] == list(range(at))
    assert (run_dir / "checkpoints" / f"step_{at:08d}" / "trainer_state.json").is_file()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Resumed from" in done.stdout
    assert [r["step"] for r in step_records(run_dir)] == list(range(32))
