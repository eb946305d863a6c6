"""Reward-hacking guards: the window logic on hand-made metric sequences, then two CPU runs."""

import json

import pytest

from gad_ray.config.schema import GuardsConfig
from gad_ray.driver.driver import train
from gad_ray.driver.guards import Guards
from gad_ray.driver.metrics import read_metrics
from tests.config_builder import make_config, tiny_run

ALL_OFF = dict.fromkeys(
    ("len_ratio_max", "truncation_rate_max", "d_acc_max", "d_acc_band", "d_margin_min", "kl_max")
)


def guards(**bounds) -> Guards:
    """Guards over a window of 3 GAD steps with only ``bounds`` on."""
    return Guards(GuardsConfig(**{"window": 3, **ALL_OFF, **bounds}))


def run(g: Guards, steps: list[dict], stage: str = "gad") -> dict[int, list]:
    """Feed one metrics record per step; {step: breaches} of the steps that reported any."""
    out = {}
    for step, metrics in enumerate(steps):
        breaches = g.update(step, {"stage": stage, **metrics})
        if breaches:
            out[step] = breaches
    return out


def feed(g: Guards, key: str, values: list[float], stage: str = "gad") -> dict[int, list]:
    """:func:`run` with one value of ``key`` per step."""
    return run(g, [{key: v} for v in values], stage)


@pytest.mark.parametrize(
    ("bound", "key", "values", "step", "mean"),
    [
        ({"len_ratio_max": 1.5}, "len_ratio", [1.0, 1.2, 1.4, 1.6, 2.0, 2.4], 4, 5.0 / 3),
        ({"truncation_rate_max": 0.5}, "truncation_rate", [0.0, 0.4, 0.6, 0.7, 0.9], 3, 1.7 / 3),
        ({"d_acc_max": 0.9}, "d_acc", [0.8, 0.85, 0.9, 0.9, 1.0], 4, 2.8 / 3),
        ({"kl_max": 0.1}, "g_kl", [0.01, 0.05, 0.1, 0.14, 0.3], 4, 0.54 / 3),
    ],
)
def test_upper_bounds_trip_at_the_step_whose_window_mean_crosses(bound, key, values, step, mean):
    tripped = feed(guards(**bound), key, values)
    assert list(tripped) == [step]
    (breach,) = tripped[step]
    name = next(iter(bound))
    assert (breach.name, breach.step, breach.window) == (name, step, 3)
    assert breach.value == pytest.approx(mean)
    assert breach.bound == bound[name]
    assert f"trainer.guards.{name}" in breach.message and f"{mean:.3g}" in breach.message


def test_a_mean_at_or_below_the_bound_does_not_trip():
    assert feed(guards(len_ratio_max=1.5), "len_ratio", [1.5, 1.5, 1.5, 1.0, 2.0, 1.5]) == {}
    # one step far above the bound is not enough when the window's mean stays below it
    assert feed(guards(len_ratio_max=1.5), "len_ratio", [1.0, 1.0, 2.4, 1.0, 1.0, 1.0]) == {}


def test_d_acc_band_needs_every_step_of_the_window_near_chance():
    g = guards(d_acc_band=0.05)
    tripped = feed(g, "d_acc", [0.5, 0.7, 0.52, 0.47, 0.49, 0.5, 0.6, 0.5])
    assert list(tripped) == [4]  # steps 2-4 are all within 0.5 +- 0.05; steps 1-3 are not
    assert tripped[4][0].value == pytest.approx(0.03)  # the largest |d_acc - 0.5| of steps 2-4


def test_d_margin_is_teacher_minus_student_score():
    g = guards(d_margin_min=0.0)
    teacher = [1.0, 1.0, 0.5, 0.2, 0.1, 0.0]
    student = [0.0, 0.5, 0.6, 0.4, 0.4, 0.3]  # margins 1.0 0.5 -0.1 -0.2 -0.3 -0.3
    steps = [
        {"d_teacher_score_mean": t, "d_student_score_mean": s}
        for t, s in zip(teacher, student, strict=True)
    ]
    tripped = run(g, steps)
    assert list(tripped) == [4]  # window of steps 1-3: mean (0.5 - 0.1 - 0.2) / 3 > 0; 2-4: < 0
    assert tripped[4][0].value == pytest.approx(-0.6 / 3)


def test_a_breach_is_reported_once_and_again_only_after_it_cleared():
    values = [2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    tripped = feed(guards(len_ratio_max=1.5), "len_ratio", values)
    # trips at step 2; steps 3-6 stay above the bound (step 6: mean 4/3 < 1.5 clears it);
    # step 9 (window 1.0 2.0 2.0) trips again
    assert list(tripped) == [2, 9]


def test_only_the_configured_stages_count():
    g = guards(len_ratio_max=1.5)
    assert feed(g, "len_ratio", [3.0] * 10, stage="warmup") == {}
    assert list(feed(g, "len_ratio", [3.0] * 3)) == [2]  # the warmup steps never filled the window
    g = Guards(GuardsConfig(window=3, stages=["warmup"], **{**ALL_OFF, "len_ratio_max": 1.5}))
    assert list(feed(g, "len_ratio", [3.0] * 3, stage="warmup")) == [2]


def test_steps_without_the_metric_are_skipped():
    g = guards(kl_max=0.1)
    steps = [{"g_kl": 0.5}, {}, {"g_kl": 0.5}, {}, {"g_kl": 0.5}]  # e.g. D-only steps have no g_kl
    assert list(run(g, steps)) == [4]


def test_disabled_or_null_bounds_report_nothing():
    hacked = {
        "stage": "gad",
        "len_ratio": 9.0,
        "truncation_rate": 1.0,
        "d_acc": 0.5,
        "d_teacher_score_mean": 0.0,
        "d_student_score_mean": 5.0,
        "g_kl": 9.0,
    }
    off = Guards(GuardsConfig(window=1, enabled=False))
    null = Guards(GuardsConfig(window=1, **ALL_OFF))
    assert all(not off.update(s, hacked) and not null.update(s, hacked) for s in range(5))
    # the same steps with the default bounds trip every guard but d_acc_max at once
    names = {b.name for b in Guards(GuardsConfig(window=1)).update(0, hacked)}
    assert names == set(ALL_OFF) - {"d_acc_max"}


def test_the_config_tree_carries_the_schema_defaults(make_cfg):
    assert make_cfg().trainer.guards == GuardsConfig()


# ---------------------------------------------------------------------------------------------
# CPU runs (tiny model, synthetic teacher). The warmup ends with the student's samples shorter
# than the teacher's (sampling at T=0.5), so the D it leaves rewards length. The healthy run
# trains GAD at lr 1e-4; the frozen-D ablation at 1e-3 blows the length up within ~10 GAD steps.
# Trajectories (seeded, reproducible) are in docs/operations.md, "Reward-hacking guards".

WARMUP, GAD = 12, 30


def run_cfg(run_dir, *extra: str):
    return make_config(
        *tiny_run(
            run_dir,
            "data.train_path='synthetic:train?n=512&seed=0&tasks=copy,upper,fruit,synonym"
            "&min_len=1&max_len=3'",
            "data.eval_path=null",
            "data.max_response_length=32",
            "data.prompts_per_step=8",
            "algorithm.grpo.n_samples=8",
            "algorithm.grpo.temperature=0.5",
            "algorithm.warmup.epochs=100",
            f"algorithm.warmup.max_steps={WARMUP}",
            "algorithm.warmup.generator_lr=3e-3",
            f"algorithm.gad.steps={GAD}",
            "algorithm.discriminator_optim.lr=1e-3",
            "learner.micro_batch_size=8",
            "trainer.save_every=100",
            "cluster.log_to_driver=false",
            *extra,
        )
    )


def records(run_dir) -> tuple[list[dict], list[dict]]:
    """The step records and the guard events of a run."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [r for r in rows if "event" not in r], [r for r in rows if r.get("event") == "guard"]


def test_frozen_d_at_a_high_lr_trips_the_length_guard_and_stops(ray_session, tmp_path, capsys):
    # at this lr the other guards (KL, D's margin) may trip before the length one: off, to
    # see the length guard alone
    cfg = run_cfg(
        tmp_path / "frozen",
        "algorithm=gad_frozen_d",
        "algorithm.generator_optim.lr=1e-3",
        "trainer.guards.action=stop",
        "trainer.guards.window=5",
        "trainer.guards.kl_max=null",
        "trainer.guards.d_margin_min=null",
        "trainer.guards.d_acc_max=null",
        "trainer.guards.d_acc_band=null",
    )
    run_dir = train(cfg)
    steps, guards = records(run_dir)
    (event,) = guards
    last = steps[-1]["step"]
    assert event["name"] == "len_ratio_max" and event["step"] == last
    assert event["value"] > 1.5 == event["bound"] and event["window"] == 5
    assert event["value"] == pytest.approx(sum(r["len_ratio"] for r in steps[-5:]) / 5)
    assert WARMUP + 5 <= last < WARMUP + GAD - 1  # stopped inside the GAD stage
    # the checkpoint of the stop step (the only one), and no final export
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{last + 1:08d}"]
    ckpt = run_dir / "checkpoints" / f"step_{last + 1:08d}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == last + 1
    assert (ckpt / "generator").is_dir() and (ckpt / "discriminator").is_dir()
    assert not (run_dir / "final").exists()
    out = capsys.readouterr().out
    assert f"WARNING [step {last}] guard len_ratio_max: mean len_ratio over the last 5" in out
    assert "trainer.guards.len_ratio_max" in out
    assert (
        "Stopped by guard len_ratio_max (trainer.guards.action=stop): saved a checkpoint at "
        f"step {last + 1} of {WARMUP + GAD}" in out
    )


def test_a_healthy_gad_run_trips_no_guard(ray_session, tmp_path):
    run_dir = train(run_cfg(tmp_path / "gad", "algorithm.generator_optim.lr=1e-4"))
    steps, guards = records(run_dir)
    assert guards == []
    assert len([r for r in steps if r["stage"] == "gad"]) == GAD  # defaults: window 20 of 30
    assert (run_dir / "final").is_dir()
