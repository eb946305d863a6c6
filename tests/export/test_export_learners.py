"""``export_checkpoint`` on learner checkpoints of the other layouts (real Ray + gloo learner
groups, the driver's run-dir layout): G and D on one shared LoRA base over 2 FSDP2 ranks, and
DeepSpeed ZeRO-2 (G fully trained over 2 ranks, D with LoRA on 1). Each export computes what the
learner computed at that step, or equals the learner's own export."""

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gad_ray import run_dir as st
from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch
from gad_ray.discriminator.learner import DiscriminatorGroup
from gad_ray.discriminator.model import DiscriminatorModel
from gad_ray.discriminator.shared import SharedGroup
from gad_ray.export import export_checkpoint
from gad_ray.learner import GeneratorGroup
from tests.config_builder import learner_config, make_config
from tests.driver.helpers import exported_weights
from tests.learner.conftest import make_token_batch, ref_logprobs

PAIRS = torch.tensor([0, 0, 1, 1])  # student row j pairs with teacher row PAIRS[j]


def run_cfg(model_dir: Path, run: Path, lora: tuple[str, ...], **learner) -> Config:
    """A learner config with LoRA (rank 4) on the ``lora`` models, written to ``run`` as the
    driver writes a run's config."""
    cfg = make_config(
        base=learner_config(model_dir),
        **{f"learner__{key}": value for key, value in learner.items()},
        **{f"model__{who}__lora": {"rank": 4, "alpha": 8.0} for who in lora},
        algorithm__discriminator_optim__lr=1e-3,
        algorithm__discriminator_optim__eps=1e-6,
        trainer__run_dir=str(run),
    )
    st.prepare_run_dir(cfg)
    return cfg


def batches() -> tuple[TokenBatch, TokenBatch, TokenBatch]:
    return (
        make_token_batch(seed=0, n=6),
        make_token_batch(seed=5, n=2),
        make_token_batch(seed=6, n=4),
    )


def logprobs(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    with torch.no_grad():
        return ref_logprobs(model, batch)[0] * batch.response_mask


def scores(model_dir: Path, batch: TokenBatch) -> torch.Tensor:
    d = DiscriminatorModel.from_pretrained(str(model_dir))
    with torch.no_grad():
        return d(batch.input_ids, batch.attention_mask, batch.response_mask)


def test_shared_lora_base_exports_g_merged_or_as_adapter_and_d(
    ray_session, tiny_model_dir, tmp_path
):
    run = tmp_path / "run"
    lora = ("student", "discriminator")
    ranks = {"generator_ranks": 2, "discriminator_ranks": 2}
    cfg = run_cfg(tiny_model_dir, run, lora, shared_base=True, **ranks)
    batch, teacher, student = batches()
    group = SharedGroup(cfg)
    role_dir = st.checkpoint_dir(run, 1) / "generator"
    try:
        group.train_sft(batch)
        group.train_bt(teacher, student, PAIRS)
        want_logp, want_scores = group.compute_logprobs(batch), group.score(batch)
        group.save_checkpoint(str(role_dir))
    finally:
        group.shutdown()
    merged = export_checkpoint(role_dir, tmp_path / "merged")  # the config's export: merged
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    torch.testing.assert_close(logprobs(model, batch), want_logp, rtol=1e-4, atol=1e-4)
    adapter = export_checkpoint(role_dir, tmp_path / "adapter", lora_export="adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(logprobs(model, batch), want_logp, rtol=1e-4, atol=1e-4)
    # D's adapter and head live in <role>/discriminator: a classifier over its own backbone
    d = export_checkpoint(role_dir, tmp_path / "d", role="discriminator")
    torch.testing.assert_close(scores(d, batch), want_scores, rtol=1e-4, atol=1e-4)
    assert want_scores.std() > 0


def test_deepspeed_zero2_exports_g_masters_and_d_as_its_learner_does(
    ray_session, tiny_model_dir, tmp_path
):
    run = tmp_path / "run"
    learner = {"backend": "deepspeed", "zero_stage": 2, "generator_ranks": 2}
    cfg = run_cfg(tiny_model_dir, run, ("discriminator",), **learner)
    batch, teacher, student = batches()
    step = st.checkpoint_dir(run, 1)
    g = GeneratorGroup(cfg)
    try:
        g.train_sft(batch)
        masters = g.full_params()
        g.save_checkpoint(str(step / "generator"))
    finally:
        g.shutdown()
    d = DiscriminatorGroup(cfg)
    try:
        d.train_bt(teacher, student, PAIRS)
        want_scores = d.score(batch)
        d.save_checkpoint(str(step / "discriminator"))
        d.save_pretrained(str(tmp_path / "live_d"))
    finally:
        d.shutdown()
    got = exported_weights(export_checkpoint(step / "generator", tmp_path / "g"))
    assert sorted(got) == sorted(masters)
    for k, v in masters.items():  # fp32 compute on CPU: the masters themselves
        assert torch.equal(got[k], v), k
    out = export_checkpoint(step / "discriminator", tmp_path / "d")
    got, live = exported_weights(out), exported_weights(tmp_path / "live_d")
    assert sorted(got) == sorted(live) and all(torch.equal(got[k], live[k]) for k in live)
    torch.testing.assert_close(scores(out, batch), want_scores, rtol=1e-4, atol=1e-4)
