"""DeepSpeed ZeRO-2/3 generator steps on 2 CPU ranks (gloo) against the single-process reference;
HF export; save -> load -> next step equal to the uninterrupted next step; reference reset."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from gad_ray.learner import GeneratorGroup
from gad_ray.learner.deepspeed_engine import deepspeed_config
from tests.config_builder import learner_config
from tests.learner.conftest import (
    ReferenceTrainer,
    assert_metrics_close,
    assert_params_close,
    make_token_batch,
)

T = 0.8  # the temperature the GRPO batches are taken to be sampled at


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_generator_steps_match_reference_and_resume(
    stage, ray_session, tiny_model_dir, tmp_path
):
    cfg = learner_config(tiny_model_dir, backend="deepspeed", zero_stage=stage, generator_ranks=2)
    ref = ReferenceTrainer(tiny_model_dir, cfg)
    group = GeneratorGroup(cfg)
    try:
        batch = make_token_batch(seed=1, n=7)  # 4 + 3 rows: rank 1 runs a dummy micro-batch
        assert_params_close(group.full_params(), ref.params())
        assert_metrics_close(group.train_sft(batch), ref.sft(batch))
        assert_params_close(group.full_params(), ref.params())

        adv = torch.randn(len(batch))
        old = group.compute_logprobs(batch) + 0.05 * torch.randn(batch.input_ids.shape)
        old = old * batch.response_mask
        want = ref.grpo(batch, adv[:, None] * batch.response_mask, old, T)
        assert_metrics_close(group.train_grpo(batch, adv, old, temperature=T), want)
        assert_params_close(group.full_params(), ref.params())

        group.save_pretrained(str(tmp_path / "hf"))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        assert_params_close({k: v.detach() for k, v in hf.named_parameters()}, ref.params())

        group.save_checkpoint(str(tmp_path / "ckpt"))  # policy, optimizer, reference, schedule
        nxt, adv2 = make_token_batch(seed=2, n=6), torch.randn(6)
        first = group.train_grpo(nxt, adv2, temperature=T)
        after = group.full_params()
        group.load_checkpoint(str(tmp_path / "ckpt"))
        assert_metrics_close(group.train_grpo(nxt, adv2, temperature=T), first, tol=1e-6)
        assert_params_close(group.full_params(), after, tol=1e-6)

        assert first["kl"] > 1e-4
        group.reset_reference()  # reference := current policy, so KL vanishes
        assert group.train_grpo(nxt, adv2, temperature=T)["kl"] == pytest.approx(0.0, abs=1e-7)
    finally:
        group.shutdown()


def test_deepspeed_config_from_learner_config(tiny_model_dir):
    cfg = learner_config(tiny_model_dir, backend="deepspeed", zero_stage=3, param_offload=True)
    optim = cfg.algorithm.generator_optim
    cpu = deepspeed_config(cfg.learner, optim, torch.device("cpu"), torch.float32)
    assert cpu["zero_optimization"] == {"stage": 3, "overlap_comm": False}  # no offload on CPU
    assert cpu["bf16"] == {"enabled": False} and cpu["gradient_clipping"] == 1.0
    assert cpu["managed_gradient_accumulation"] is False
    gpu = deepspeed_config(cfg.learner, optim, torch.device("cuda"), torch.bfloat16)
    assert gpu["bf16"] == {"enabled": True}
    assert gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
