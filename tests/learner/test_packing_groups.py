"""Learner groups with packed micro-batches (``learner.packing=true``) on real Ray + gloo + FSDP2:
G's log-probs, SFT and GRPO steps and D's scores and BT step equal the padded single-process
references, a shared LoRA base packed equals it padded, and every update logs ``pad_ratio``,
the tokens its micro-batches computed over the real ones."""

import pytest
import torch

from gad_ray.data.batch import TokenBatch, concat_batches
from gad_ray.discriminator import DiscriminatorGroup, DiscriminatorModel
from gad_ray.discriminator.shared import SharedGroup
from gad_ray.learner import GeneratorGroup
from gad_ray.learner.lora import DISCRIMINATOR, GENERATOR
from gad_ray.learner.packing import micro_batch
from gad_ray.models.loading import load_tokenizer
from tests.discriminator.test_learner import (
    PAIRS,
    ReferenceBT,
    batches,
    check_step_matches_reference,
    disc_cfg,
)
from tests.learner.test_generator import T, _steps
from tests.learner.test_lora import adapter, assert_weights_close, lora_cfg

CPU = torch.device("cpu")
BUDGET = 48  # tokens per micro-batch: several rows of make_token_batch's 5-21 tokens each


def expected_pad_ratio(group, batch: TokenBatch) -> float:
    """Tokens computed / real over the plan of ``batch``, each micro-batch built as the workers
    build it (a dummy row 0 for an empty one)."""
    computed = real = 0
    for rank in group.plan(batch):
        for idx in rank:
            computed += micro_batch(batch, idx or [0], CPU, group.packing).computed_tokens()
            real += batch.select(idx).num_tokens() if idx else 0
    return computed / real


def test_packed_generator_steps_equal_single_process(ray_session, tiny_model_dir, lh):
    batch = lh.make_token_batch(seed=0, n=6)
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(len(batch), generator=gen)
    noise = 0.3 * torch.randn(batch.input_ids.shape, generator=gen) * batch.response_mask
    cfg = lh.learner_config(
        tiny_model_dir, generator_ranks=2, max_tokens_per_micro_batch=BUDGET, packing=True
    )
    group = GeneratorGroup(cfg)
    try:
        assert group.packing and group.run_all("packs") == [True, True]
        plan = group.plan(batch)
        got = _steps(group, batch, adv, noise)
    finally:
        group.shutdown()
    assert max(len(mb) for rank in plan for mb in rank) >= 2  # rows really share a packed row
    ref = lh.ReferenceTrainer(tiny_model_dir, cfg)
    mask = batch.response_mask
    for key, temp in (("logprobs", 1.0), ("logprobs_t", T)):
        want = lh.ref_logprobs(ref.model, batch, temp)[0].detach() * mask
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5)
    lh.assert_metrics_close(got["sft"], ref.sft(batch))
    tokens_adv = adv[:, None] * mask
    lh.assert_metrics_close(got["grpo"], ref.grpo(batch, tokens_adv, got["old"], T))
    lh.assert_metrics_close(got["grpo_on_policy"], ref.grpo(batch, tokens_adv, None, T))
    assert got["grpo"]["pg_clipfrac"] > 0 and got["grpo"]["kl"] > 0  # not vacuous
    lh.assert_params_close(got["params"], ref.params())
    for step in ("sft", "grpo", "grpo_on_policy"):  # no padding, no empty micro-batch
        assert got[step]["pad_ratio"] == 1.0


def test_packed_discriminator_step_equals_single_process(ray_session, tiny_model_dir, tmp_path):
    init = tmp_path / "disc-init"
    model = DiscriminatorModel.from_pretrained(str(tiny_model_dir), seed=1)
    model.save_pretrained(str(init), load_tokenizer(str(tiny_model_dir)))
    cfg = disc_cfg(tiny_model_dir, init, max_tokens_per_micro_batch=BUDGET, packing=True)
    group = DiscriminatorGroup(cfg)
    try:
        assert group.packing
        check_step_matches_reference(group, ReferenceBT(init, cfg), seed=10)
        teacher, student = batches(20)
        assert group.train_bt(teacher, student, PAIRS)["pad_ratio"] == pytest.approx(
            expected_pad_ratio(group, concat_batches(teacher, student))
        )
    finally:
        group.shutdown()


def test_shared_lora_base_packed_equals_padded(ray_session, tiny_model_dir, lh):
    """G's SFT and GRPO and D's BT step through G's and D's adapters on one base: packed equals
    padded; each logs the pad_ratio of its own plan (padded: rows x longest row)."""
    batch = lh.make_token_batch(seed=0, n=6)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    teacher, student = lh.make_token_batch(seed=5, n=2), lh.make_token_batch(seed=6, n=4)
    pairs = torch.tensor([0, 0, 1, 1])

    def run(packing: bool) -> dict:
        learner = {
            "generator_ranks": 2,
            "discriminator_ranks": 2,
            "max_tokens_per_micro_batch": BUDGET,
        }
        group = SharedGroup(lora_cfg(tiny_model_dir, shared=True, packing=packing, **learner))
        try:
            assert group.packing == packing
            out = {"sft": group.train_sft(batch), "bt": group.train_bt(teacher, student, pairs)}
            out["grpo"] = group.train_grpo(
                batch, adv, group.compute_logprobs(batch, T), temperature=T
            )
            out["scores"], out["params"] = group.score(student), group.full_params()
            out["ratios"] = {
                "sft": expected_pad_ratio(group, batch),
                "bt": expected_pad_ratio(group, concat_batches(teacher, student)),
            }
            out["ratios"]["grpo"] = out["ratios"]["sft"]
            return out
        finally:
            group.shutdown()

    padded, packed = run(False), run(True)
    for step in ("sft", "bt", "grpo"):
        lh.assert_metrics_close(packed[step], padded[step])
        assert packed[step]["pad_ratio"] == 1.0
        assert padded[step]["pad_ratio"] == pytest.approx(padded["ratios"][step])
    assert padded["sft"]["pad_ratio"] > 1.0  # padding was computed, and counted
    torch.testing.assert_close(packed["scores"], padded["scores"], rtol=1e-5, atol=1e-5)
    for name in (GENERATOR, DISCRIMINATOR):
        assert_weights_close(adapter(packed["params"], name), adapter(padded["params"], name))
