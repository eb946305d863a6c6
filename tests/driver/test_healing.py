"""A run heals itself (CPU, real Ray, vLLM, gloo, the HTTP teacher): dead actors and a teacher
outage cost time, not the run; resume edge cases; checkpoints that cannot be trusted."""

import os
import resource
import signal
import threading
import time

import pytest
import ray
import torch
from safetensors.torch import load_file

from gad_ray import run_dir as st
from gad_ray.driver.driver import Driver, TrainingAborted, train
from gad_ray.driver.metrics import read_metrics
from gad_ray.synthetic.server import start_server_thread
from tests.config_builder import make_config, tiny_run

from .conftest import TEACHER_KEY_ENV
from .helpers import assert_same_records, step_records

# deterministic tasks (the multi-modal ones draw their answer at random per request)
TASKS = "tasks=copy,upper,reverse,sort"


def _events(run_dir, name):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == name]


def _assert_same_run(a_dir, b_dir):
    """Every step's every metric but wall-clock ones, and the exported student's weights."""
    assert_same_records(step_records(b_dir), step_records(a_dir))
    wa = load_file(a_dir / "final" / "model.safetensors")
    wb = load_file(b_dir / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def teacher():
    server = start_server_thread(api_key=os.environ[TEACHER_KEY_ENV])
    yield server
    server.stop()


def _cfg(run_dir, base_url, *extra):
    """2 warmup + 4 GAD steps over 4 batches of 4 prompts (an epoch ends at step 4), the
    teacher live over HTTP, a checkpoint every step."""
    return make_config(
        *tiny_run(
            run_dir,
            f"data.train_path='synthetic:train?n=16&seed=0&{TASKS}'",
            f"data.eval_path='synthetic:eval?n=8&seed=1&{TASKS}'",
            "algorithm.gad.steps=4",
            "teacher=api",
            f"teacher.api.base_url={base_url}",
            "teacher.api.model=synthetic-teacher",
            f"teacher.api.api_key_env={TEACHER_KEY_ENV}",
            "teacher.api.max_retries=1",
            "teacher.api.timeout_s=2",
            "teacher.api.backoff_base_s=0.2",
            "teacher.api.backoff_max_s=0.5",
            "teacher.prefetch_batches=0",
            "trainer.save_every=1",
            "trainer.keep_last=10",
            *extra,
        )
    )


@pytest.fixture(scope="module")
def reference(ray_session, teacher, tmp_path_factory):
    return train(_cfg(tmp_path_factory.mktemp("ref") / "run", teacher.base_url))


def test_chaos_run_finishes_by_itself_like_an_uninterrupted_run(reference, teacher, tmp_path):
    """Kill a rollout worker, then a generator rank, then a discriminator rank, and take the
    teacher API down for a while, all in one run. The rollout worker is replaced within its
    step (its share regenerated with the same seeds and weights); each learner death restarts
    every role from the last checkpoint (the lost step replayed from its saved RNG and data
    position); the outage only makes steps wait. So every step's metrics and the exported
    student equal the uninterrupted run's, exactly what is compared below."""
    down = start_server_thread(api_key=os.environ[TEACHER_KEY_ENV])  # a second API to stop
    cfg = _cfg(tmp_path / "run", down.base_url, "teacher.api.outage_timeout_s=300")
    driver = Driver(cfg)
    log: list[str] = []

    def chaos() -> None:
        def at(step: int) -> None:
            while driver.step < step:
                time.sleep(0.05)

        at(1)
        ray.kill(driver.roles["rollout"].workers[0])
        log.append("rollout")
        at(2)
        down.stop()  # the API goes away; the next new batch (step 3, epoch 1) has to wait
        log.append("teacher down")
        while driver.data.waits == 0:
            time.sleep(0.1)
        back = start_server_thread(port=down.port, api_key=os.environ[TEACHER_KEY_ENV])
        log.append("teacher back")
        at(4)
        ray.kill(driver.roles["generator"].workers[0])
        log.append("generator")
        at(5)
        ray.kill(driver.roles["discriminator"].workers[0])
        log.append("discriminator")
        at(6)
        back.stop()

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        run_dir = driver.fit()
    finally:
        driver.shutdown()
    thread.join(timeout=60)
    assert log == ["rollout", "teacher down", "teacher back", "generator", "discriminator"]
    assert len(_events(run_dir, "rollout_workers_replaced")) == 1
    restarts = _events(run_dir, "restart")
    assert [r["restart"] for r in restarts] == [1, 2]
    assert "generator" in restarts[0]["error"] and "discriminator" in restarts[1]["error"]
    _assert_same_run(reference, run_dir)


def test_resume_exactly_at_an_epoch_boundary(reference, teacher, tmp_path):
    cfg = _cfg(tmp_path / "run", teacher.base_url)
    driver = Driver(cfg)
    try:
        driver.fit(stop_at=4)  # 16 prompts / 4 per step: step 4 starts the second epoch
    finally:
        driver.shutdown()
    data = st.read_trainer_state(tmp_path / "run/checkpoints/step_00000004")["data"]
    assert (data["epoch"], data["index"]) == (0, 16)  # the whole first epoch consumed
    _assert_same_run(reference, train(cfg))


def test_a_cut_short_checkpoint_is_skipped_for_the_previous_complete_one(reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = st.complete_checkpoints(run)[-1]
    shard = max((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn write
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*{newest.name}.* bytes"):
        done = st.complete_checkpoints(run)
    assert newest not in done and done[-1].name == "step_00000005"
    (done[-1] / st.STATE_FILE).unlink()  # a save that never finished: skipped silently
    assert st.complete_checkpoints(run)[-1].name == "step_00000004"


def _limit_file_size(actor) -> None:
    """Fault injection: writes past 256 KiB fail (EFBIG) in that actor's process."""

    def apply(self) -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

    ray.get(actor.__ray_call__.remote(apply))


def test_a_full_disk_during_a_save_leaves_no_checkpoint_that_looks_complete(
    ray_session, teacher, tmp_path
):
    cfg = _cfg(tmp_path / "run", teacher.base_url)
    driver = Driver(cfg)
    try:
        driver.fit(stop_at=1)
        _limit_file_size(driver.roles["generator"].workers[0])
        with pytest.raises(TrainingAborted, match=r"could not write checkpoint .*step_00000002"):
            driver.fit(stop_at=2)
    finally:
        driver.shutdown()
    assert [p.name for p in st.complete_checkpoints(tmp_path / "run")] == ["step_00000001"]
    assert not (tmp_path / "run/checkpoints/step_00000002").exists()
