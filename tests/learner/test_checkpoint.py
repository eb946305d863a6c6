"""Sharded checkpoints resume exactly (also on another world size); HF export reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gad_ray.learner import GeneratorGroup, LearnerError

T = 0.8  # the temperature the GRPO batches are taken to be sampled at


@pytest.fixture(scope="module")
def resumed(ray_session, tiny_model_dir, lh, tmp_path_factory):
    """SFT, reset reference, save; then the next GRPO step three ways: uninterrupted, after
    loading into the same group, after loading into a fresh 1-rank group."""
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "step_1")
    export = str(tmp_path_factory.mktemp("hf") / "export")
    batch = lh.make_token_batch(seed=1, n=5)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
    two = GeneratorGroup(lh.learner_config(tiny_model_dir, generator_ranks=2, micro_batch_size=2))
    one = None
    try:
        two.train_sft(batch)
        two.reset_reference()
        two.train_sft(batch)  # policy != reference, so the saved reference matters
        two.save_checkpoint(ckpt)
        out = {"first": (two.train_grpo(batch, adv, temperature=T), two.full_params())}
        two.load_checkpoint(ckpt)
        out["same_group"] = (two.train_grpo(batch, adv, temperature=T), two.full_params())
        two.save_pretrained(export)
        out["export"] = (export, two.compute_logprobs(batch))
        one = GeneratorGroup(
            lh.learner_config(tiny_model_dir, generator_ranks=1, micro_batch_size=1)
        )
        one.load_checkpoint(ckpt)
        out["one_rank"] = (one.train_grpo(batch, adv, temperature=T), one.full_params())
        out["batch"], out["one_rank_group"] = batch, one
        yield out
    finally:
        two.shutdown()
        if one is not None:
            one.shutdown()


def test_resume_in_same_group_equals_uninterrupted_step(resumed, lh):
    (m1, p1), (m2, p2) = resumed["first"], resumed["same_group"]
    assert m1["kl"] > 0
    lh.assert_metrics_close(m2, m1, tol=1e-6)
    lh.assert_params_close(p2, p1, tol=1e-6)


def test_resume_on_another_world_size_equals_uninterrupted_step(resumed, lh):
    (m1, p1), (m3, p3) = resumed["first"], resumed["one_rank"]
    lh.assert_metrics_close(m3, m1)
    lh.assert_params_close(p3, p1)


def test_hf_export_reloads_with_identical_logprobs(resumed, lh, tiny_model_dir):
    path, logprobs = resumed["export"]
    batch = resumed["batch"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        got = lh.ref_logprobs(model, batch)[0] * batch.response_mask
    torch.testing.assert_close(got, logprobs, rtol=1e-5, atol=1e-5)
    params = dict(model.named_parameters())
    for name, want in resumed["same_group"][1].items():
        torch.testing.assert_close(params[name], want, rtol=0, atol=0, msg=name)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()


def test_loading_a_missing_checkpoint_names_it(resumed, tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(
        LearnerError, match=rf"rank 0 failed: .*{missing}.* is not a learner checkp"
    ):
        resumed["one_rank_group"].load_checkpoint(missing)
