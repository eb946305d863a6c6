"""metrics.py and samples.py without a run: W&B (the real package, offline) continues the same
run after a resume and takes tags; a missing wandb is a config error; eval samples go to
metrics.jsonl, TensorBoard (text) and W&B (a table); the plot's panels and stage labels."""

import subprocess
import sys

import matplotlib
import pytest

from gad_ray.config.schema import ConfigError, TrainerConfig, WandbConfig
from gad_ray.data.tokenize import TokenizedExample
from gad_ray.driver.metrics import (
    MetricsLogger,
    plot_figure,
    plot_series,
    read_metrics,
    stage_spans,
)
from gad_ray.driver.samples import COLUMNS, eval_samples
from gad_ray.hydra_app import compose
from gad_ray.models.loading import load_tokenizer
from gad_ray.rollout.types import Sample

from .wandb_offline import offline_runs

matplotlib.use("Agg")

ROWS = [
    {"prompt": "Copy: a b", "student": "a b", "teacher": "a b", "d_student": 0.1, "d_teacher": 0.7},
    {"prompt": "Upper: c", "student": "c", "teacher": "C", "d_student": -0.2, "d_teacher": None},
]


def _trainer(run_dir, **extra) -> TrainerConfig:
    return TrainerConfig(
        run_dir=str(run_dir),
        tensorboard=True,
        wandb=WandbConfig(project="gad-test", mode="offline", tags=["tiny", "ci"]),
        **extra,
    )


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path):
    cfg = _trainer(tmp_path)
    first = MetricsLogger(cfg, tmp_path, 4, 0, run_config={"name": "x"}, live=False)
    for step in range(3):
        first.log(step, {"stage": "warmup", "g_loss": 1.0 + step})
    first.log_event(2, "after_warmup", {"eval_accuracy": 0.25}, samples=ROWS)
    first.close()  # the run stops here; its last checkpoint is at step 2
    run_id = (tmp_path / "wandb_run_id").read_text().strip()

    second = MetricsLogger(cfg, tmp_path, 4, 2, run_config={"name": "x"}, live=False)
    for step in (2, 3):
        second.log(step, {"stage": "gad", "g_loss": 0.5, "g_pg_loss": 0.4 - step / 10})
    second.log_event(4, "final", {"eval_accuracy": 0.5}, samples=ROWS[:1])
    second.close()

    runs = offline_runs(tmp_path / "wandb")
    assert [r.run_id for r in runs] == [run_id, run_id]  # one W&B run, logged to twice
    assert all(r.project == "gad-test" and r.tags == ["tiny", "ci"] for r in runs)
    assert [[h["_step"] for h in r.history] for r in runs] == [[0, 1, 2], [2, 3, 4]]
    assert runs[0].history[2]["g_loss"] == 3.0 and runs[0].history[2]["eval_accuracy"] == 0.25
    assert runs[1].history[2]["eval_accuracy"] == 0.5
    assert runs[0].tables == [
        {
            "columns": ["step", "eval", *COLUMNS],
            "data": [[2, "after_warmup", *r.values()] for r in ROWS],
        }
    ]
    assert runs[1].tables[0]["data"] == [[4, "final", *ROWS[0].values()]]

    # metrics.jsonl: the steps since the checkpoint once, each eval with its samples
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("event", r.get("stage"))) for r in records] == [
        (0, "warmup"),
        (1, "warmup"),
        (2, "gad"),
        (3, "gad"),
        (4, "final"),
    ]
    assert records[-1]["samples"] == ROWS[:1] and records[-1]["eval_accuracy"] == 0.5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    tb.Reload()
    (text,) = tb.Tensors("samples/final/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | student | teacher | d_student | d_teacher |")
    assert "| Copy: a b | a b | a b | 0.1 | 0.7 |" in table


def test_missing_wandb_is_a_config_error(monkeypatch):
    compose(["trainer.wandb.project=gad"])  # installed: fine
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    compose([])  # W&B off: not needed
    with pytest.raises(ConfigError) as err:
        compose(["trainer.wandb.project=gad"])
    assert "trainer.wandb.project='gad' needs the wandb package" in str(err.value)
    assert "pip install 'gad-ray[wandb]'" in str(err.value)


def test_gad_train_without_wandb_stops_before_ray(tmp_path):
    # the console script's entry point, in a Python where `import wandb` fails
    code = (
        "import sys; sys.modules['wandb'] = None; "
        "from gad_ray.driver.cli import main; "
        "sys.argv = ['gad-train', 'trainer.wandb.project=gad', 'model=tiny']; main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "needs the wandb package" in out.stderr and "Traceback" not in out.stderr
    assert "Ray" not in out.stdout + out.stderr  # no local Ray was started
    assert not (tmp_path / "outputs" / "tiny_cpu" / "config.yaml").exists()


def test_eval_samples_are_the_first_prompts_decoded(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    texts = ["red fox", "blue", "green sea"]
    examples = [
        TokenizedExample(
            id=str(i),
            prompt_ids=tok.encode(f"prompt {i}"),
            response_ids=tok.encode(t.upper()),
            response_truncated=False,
            messages=[{"role": "user", "content": f"say {t}"}],
            response=t.upper(),
        )
        for i, t in enumerate(texts)
    ]
    samples = [  # in completion order, as workers return them
        Sample(i, tok.encode(texts[i]), [0.0] * len(tok.encode(texts[i])), "stop")
        for i in (2, 0, 1)
    ]
    rows = eval_samples(examples, samples, tok, 2)
    assert rows == [
        {"prompt": "say red fox", "student": "red fox", "teacher": "RED FOX"}
        | {"d_student": None, "d_teacher": None},
        {"prompt": "say blue", "student": "blue", "teacher": "BLUE"}
        | {"d_student": None, "d_teacher": None},
    ]
    assert eval_samples(examples, samples, tok, 0) == []


def _records():
    steps = [
        {"step": 0, "stage": "warmup", "g_loss": 2.0, "d_loss": 0.7},
        {"step": 1, "stage": "warmup", "g_loss": 1.5, "d_loss": 0.6},
        {"step": 2, "stage": "gad", "g_loss": 0.3, "g_pg_loss": 0.2, "d_loss": 0.69},
        {"step": 3, "stage": "gad", "g_loss": 0.1, "g_pg_loss": 0.05, "d_loss": 0.68},
    ]
    events = [
        {"step": 0, "event": "before_warmup", "eval_accuracy": 0.0, "samples": ROWS},
        {"step": 2, "event": "after_warmup", "eval_accuracy": 0.5},
        {"step": 4, "event": "final", "eval_accuracy": 0.75},
    ]
    return [events[0], *steps[:2], events[1], *steps[2:], events[2]]


def test_plot_draws_sft_and_policy_gradient_losses_apart():
    panels = dict(plot_series(_records()))
    assert dict(panels["generator SFT loss"]) == {"g_loss": [[(0, 2.0), (1, 1.5)]]}
    assert dict(panels["generator policy-gradient loss"]) == {
        "g_pg_loss": [[(2, 0.2), (3, 0.05)]],
        "g_loss": [[(2, 0.3), (3, 0.1)]],
    }
    # a curve spanning two stages is drawn as one segment per stage, never joined
    assert dict(panels["discriminator"]) == {
        "d_loss": [[(0, 0.7), (1, 0.6)], [(2, 0.69), (3, 0.68)]]
    }
    assert dict(panels["eval"]) == {"eval_accuracy": [[(0, 0.0), (2, 0.5), (4, 0.75)]]}
    assert "reward" not in panels  # nothing logged: no panel


def test_plot_labels_the_stages():
    records = _records()
    assert stage_spans(records) == [("warmup", 0, 1), ("gad", 2, 3)]
    fig = plot_figure(records)
    drawn = [ax for ax in fig.axes if ax.get_title()]
    assert len(drawn) == 4
    for ax in drawn:
        labels = {(t.get_text().strip(), t.get_position()[0]) for t in ax.texts}
        assert labels == {("warmup", 0), ("gad", 2)}  # each stage's name at its first step
        boundaries = [ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == "--"]
        assert boundaries == [2]
