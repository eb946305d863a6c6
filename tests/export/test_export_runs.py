"""``gad-export`` and ``gad-eval`` on the checkpoints of real tiny CPU runs (Ray, vLLM, gloo):
a checkpoint's export is the learner's own export at that step (``trainer.export_every`` and
``final/``: the fp32 masters in the compute dtype, the same greedy text), with the base model's
generation config. FSDP2 (G on 2 ranks, D on 1), and DeepSpeed ZeRO-3 with LoRA."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from gad_ray.driver.driver import train
from gad_ray.eval.cli import exported_models, run_eval
from gad_ray.export.cli import main as gad_export
from gad_ray.export.convert import SOURCE_FILE
from gad_ray.hydra_app import compose
from gad_ray.synthetic.server import start_server_thread
from gad_ray.synthetic.tasks import make_dataset, write_dataset
from tests.config_builder import make_config, tiny_run
from tests.driver.helpers import exported_weights, model_weights
from tests.export.conftest import greedy


def ckpt(run: Path, step: int, role: str = "generator") -> Path:
    return run / "checkpoints" / f"step_{step:08d}" / role


def live(run: Path, step: int) -> Path:
    """The generator learner's own export at ``step`` (``trainer.export_every``)."""
    return run / "exports" / f"step_{step:08d}"


def assert_equal_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fsdp_run(ray_session, base_dir, tmp_path_factory) -> Path:
    """4 steps (2 SFT warmup, 2 GAD), checkpoints and exports at steps 2 and 4."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    extra = (f"model.student.path={base_dir}", "learner.generator_ranks=2")
    return train(make_config(*tiny_run(run, *extra, "trainer.export_every=2")))


def test_mid_run_checkpoint_exports_as_the_learner_at_that_step(fsdp_run, base_dir, tmp_path):
    run = fsdp_run
    gad_export([str(ckpt(run, 2).parent), str(tmp_path / "s2")])  # a step dir: G by default
    got, masters = exported_weights(tmp_path / "s2"), model_weights(ckpt(run, 2))
    tied = masters.pop("lm_head.weight")  # the embedding's: the tied export stores it once
    assert torch.equal(tied, masters["model.embed_tokens.weight"])
    assert_equal_weights(got, exported_weights(live(run, 2)))
    assert_equal_weights(got, {k: v.to(torch.float32) for k, v in masters.items()})
    assert greedy(tmp_path / "s2", base_dir) == greedy(live(run, 2), base_dir)
    # --dtype: the masters cast, whatever the run computed in
    gad_export([str(ckpt(run, 2)), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert_equal_weights(
        exported_weights(tmp_path / "bf16"), {k: v.to(torch.bfloat16) for k, v in masters.items()}
    )
    record = json.loads((tmp_path / "bf16" / SOURCE_FILE).read_text())
    assert record == {
        "checkpoint": str(ckpt(run, 2)),
        "role": "generator",
        "step": 2,
        "dtype": "bfloat16",
    }
    start = exported_weights(base_dir)
    assert max_diff(got, start) > 1e-3  # the steps trained it
    # a role's directory copied out of its run, with the run's config named
    shutil.copytree(ckpt(run, 2), tmp_path / "copied")
    gad_export(
        [str(tmp_path / "copied"), str(tmp_path / "c"), "--config", str(run / "config.yaml")]
    )
    assert_equal_weights(exported_weights(tmp_path / "c"), got)


def test_run_dir_exports_its_newest_checkpoint_as_final(fsdp_run, base_dir, tmp_path, capsys):
    run = fsdp_run
    with pytest.raises(SystemExit) as exit_:  # the default folder: trainer.export_every's, kept
        gad_export([str(run)])
    assert exit_.value.code == 2
    assert f"{live(run, 4)}' already exists" in capsys.readouterr().err
    gad_export([str(run), str(tmp_path / "newest")])
    got = exported_weights(tmp_path / "newest")
    assert_equal_weights(got, exported_weights(run / "final"))
    assert max_diff(got, exported_weights(live(run, 2))) > 1e-5  # step 4, not 2
    assert greedy(tmp_path / "newest", base_dir) == greedy(run / "final", base_dir)


def test_every_export_keeps_the_base_generation_config(fsdp_run, base_dir, tmp_path):
    """final/, trainer.export_every's and gad-export's folders hold the base model's
    generation_config.json, not one transformers derives from config.json."""
    want = (base_dir / "generation_config.json").read_text()
    gad_export([str(ckpt(fsdp_run, 2)), str(tmp_path / "g")])
    for folder in (fsdp_run / "final", live(fsdp_run, 2), tmp_path / "g"):
        assert (folder / "generation_config.json").read_text() == want, folder


def test_discriminator_exports_as_a_sequence_classifier(fsdp_run):
    gad_export([str(fsdp_run), "--role", "discriminator"])
    out = live(fsdp_run, 4).with_name("step_00000004-discriminator")
    model, info = AutoModelForSequenceClassification.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_labels == 1 and not (out / "generation_config.json").exists()
    assert_equal_weights(exported_weights(out), model_weights(ckpt(fsdp_run, 4, "discriminator")))


def test_gad_eval_scores_a_run_dir_as_its_final_model(fsdp_run, tmp_path, monkeypatch):
    """A run dir in eval.models is exported (its newest checkpoint, step 4) and generates what
    final/ generates, item by item (greedy, vLLM); a second call reuses the export."""
    data = write_dataset(tmp_path / "syn.jsonl", make_dataset(4, seed=5))
    out = tmp_path / "eval"
    with start_server_thread(seed=0) as judge:
        monkeypatch.setenv("GAD_EXPORT_TEST_KEY", "unused")
        cfg = compose(
            [
                f"eval.models=[{{name: ckpt, path: '{fsdp_run}'}}, "
                f"{{name: final, path: '{fsdp_run / 'final'}'}}]",
                f"eval.sets=[{{name: syn, path: '{data}'}}]",
                f"eval.judge.base_url={judge.base_url}",
                "eval.judge.model=synthetic-judge",
                "eval.judge.api_key_env=GAD_EXPORT_TEST_KEY",
                "eval.max_new_tokens=8",
                f"eval.output_dir={out}",
                f"trainer.run_dir={out}",
            ]
        )
        rows = run_eval(cfg)
    assert [(r["model"], r["n"]) for r in rows if r["model"] != "teacher"] == [
        ("ckpt", 4),
        ("final", 4),
    ]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    answers = {m: [s["response"] for s in samples if s["model"] == m] for m in ("ckpt", "final")}
    assert answers["ckpt"] == answers["final"] and len(answers["ckpt"]) == 4
    folder = out / "models" / "ckpt"
    assert json.loads((folder / SOURCE_FILE).read_text())["checkpoint"] == str(ckpt(fsdp_run, 4))
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert [m.path for m in exported_models(cfg, out)] == [str(folder), str(fsdp_run / "final")]
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # reused


@pytest.fixture(scope="module")
def ds_lora_run(ray_session, base_dir, tmp_path_factory) -> Path:
    """The same run with DeepSpeed ZeRO-3 learners training LoRA adapters; the student's
    export (final/, trainer.export_every) is peft's adapter directory."""
    run = tmp_path_factory.mktemp("ds_lora") / "run"
    extra = (
        f"model.student.path={base_dir}",
        "learner=deepspeed",
        "model.student.lora.rank=4",
        "model.student.lora.export=adapter",
        "model.discriminator.lora.rank=4",
        "trainer.export_every=2",
    )
    return train(make_config(*tiny_run(run, *extra)))


def test_lora_checkpoint_exports_the_adapter_or_the_merged_model(ds_lora_run, base_dir, tmp_path):
    run = ds_lora_run
    assert "zero_stage: 3" in (run / "config.yaml").read_text()
    gad_export([str(ckpt(run, 2)), str(tmp_path / "adapter")])  # the config's: an adapter dir
    for name in ("adapter_config.json", "lora_base.json"):
        assert (tmp_path / "adapter" / name).read_text() == (live(run, 2) / name).read_text()
    got = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert_equal_weights(got, load_file(live(run, 2) / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in got.items() if ".lora_B." in k) > 0  # trained

    gad_export([str(run), str(tmp_path / "merged"), "--lora-export", "merged"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    final = PeftModel.from_pretrained(base, run / "final").merge_and_unload()
    assert max_diff(merged.state_dict(), final.state_dict()) < 1e-6
    assert greedy(merged, base_dir) == greedy(final, base_dir)
    generation = (tmp_path / "merged" / "generation_config.json").read_text()
    assert generation == (base_dir / "generation_config.json").read_text()

    gad_export([str(run), str(tmp_path / "d"), "--role", "discriminator"])  # merged (config)
    d, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "d", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    start = exported_weights(base_dir)
    backbone = d.model.state_dict()
    moved = {k: (v - start[f"model.{k}"]).abs().max().item() for k, v in backbone.items()}
    assert max(moved.values()) > 0 and min(moved.values()) == 0  # adapted linears only
