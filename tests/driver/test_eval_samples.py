"""A tiny CPU run logs a few generated samples per eval (prompt, student, teacher, D's scores)
to metrics.jsonl, TensorBoard and W&B (offline, the real package); stopped and resumed, it
keeps logging to the same W&B run."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gad_ray.driver.driver import Driver, train
from gad_ray.driver.samples import COLUMNS

from .helpers import event_records, step_records
from .wandb_offline import offline_runs


def test_eval_samples_and_wandb_across_a_resume(ray_session, make_cfg):
    cfg = make_cfg(
        "trainer.tensorboard=true",
        "trainer.log_samples=3",
        "trainer.wandb.project=gad-test",
        "trainer.wandb.mode=offline",
        "trainer.wandb.tags=[tiny,ci]",
    )
    driver = Driver(cfg)
    try:
        run_dir = driver.fit(stop_at=3)  # 2 warmup steps, 1 GAD step; a checkpoint at 3
    finally:
        driver.shutdown()
    assert train(cfg) == run_dir  # resumes at step 3, runs step 3 and the final eval

    assert [r["step"] for r in step_records(run_dir)] == [0, 1, 2, 3]
    evals = {r["event"]: r for r in event_records(run_dir)}
    assert {k: r["step"] for k, r in evals.items()} == {
        "before_warmup": 0,
        "after_warmup": 2,
        "final": 4,
    }
    for label, r in evals.items():
        rows = r["samples"]
        assert len(rows) == 3 and all(list(row) == list(COLUMNS) for row in rows), label
        for row in rows:
            assert row["prompt"] and row["teacher"], (label, row)  # the eval set's text
            assert isinstance(row["student"], str)
            # D is alive at every eval of a GAD run: it scores both responses
            assert isinstance(row["d_teacher"], float), (label, row)
            assert row["d_student"] is None or isinstance(row["d_student"], float)
    # the same prompts each time; D trained in between, so its scores moved
    first, last = evals["before_warmup"]["samples"], evals["final"]["samples"]
    assert [r["prompt"] for r in first] == [r["prompt"] for r in last]
    assert [r["d_teacher"] for r in first] != [r["d_teacher"] for r in last]

    tb = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    tb.Reload()
    for label in evals:
        (text,) = tb.Tensors(f"samples/{label}/text_summary")
        table = text.tensor_proto.string_val[0].decode()
        assert evals[label]["samples"][0]["prompt"].split("\n")[0][:20] in table

    runs = offline_runs(run_dir / "wandb")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert [r.run_id for r in runs] == [run_id, run_id]  # stopped, resumed: one W&B run
    assert all(r.tags == ["tiny", "ci"] for r in runs)
    steps = [sorted({h["_step"] for h in r.history}) for r in runs]
    assert steps == [[0, 1, 2], [3, 4]]
    assert any("d_loss" in h for h in runs[0].history)
    assert runs[1].history[-1]["eval_len_mean"] == evals["final"]["eval_len_mean"]
    tables = [t for r in runs for t in r.tables]
    assert [t["data"][0][:2] for t in tables] == [
        [0, "before_warmup"],
        [2, "after_warmup"],
        [4, "final"],
    ]
    assert tables[-1]["data"][0][2:] == list(evals["final"]["samples"][0].values())
