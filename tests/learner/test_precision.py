"""fp32 master weights under bf16 compute (the paper's recipe: bf16, lr 1e-6) on both backends.

With bf16 masters an Adam step at lr 1e-6 rounds away (the bf16 spacing near 0.02 is ~1.2e-4).
Here G and D train with ``model.*.dtype=bfloat16`` on CPU (bf16 compute runs on CPU torch): one
step must move essentially every weight the fp32 step moves, by the same amount within bf16
compute noise; a checkpoint round trip keeps the fp32 masters; the rollout workers receive bf16
weights; the HF export loads in bf16.
"""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from gad_ray.config.schema import RolloutConfig
from gad_ray.discriminator.learner import DiscriminatorGroup
from gad_ray.learner import GeneratorGroup
from gad_ray.rollout.hf_worker import HFRolloutWorker
from tests.config_builder import make_config
from tests.learner.conftest import ReferenceTrainer, make_token_batch

LR = 1e-6


def bf16_cfg(model_dir, backend: str, dtype: str = "bfloat16", **learner):
    optim = {"lr": LR, "grad_clip": None, "weight_decay": 0.0}
    return make_config(
        hydra=False,
        model__student={"path": str(model_dir), "dtype": dtype},
        model__discriminator__dtype=dtype,
        algorithm={
            "name": "gad",
            "grpo": {"n_samples": 2},
            "generator_optim": optim,
            "discriminator_optim": optim,
        },
        data={"train_path": "unused.jsonl", "prompts_per_step": 4},
        learner={"backend": backend, "micro_batch_size": 2, **learner},
    )


def deltas(after: dict, before: dict) -> dict[str, torch.Tensor]:
    return {k: (after[k].double() - before[k].double()) for k in before}


def moved_fraction(d: dict[str, torch.Tensor], where: dict[str, torch.Tensor]) -> float:
    """Fraction of the elements in ``where`` (masks) whose delta is nonzero."""
    moved = sum(int(((d[k] != 0) & where[k]).sum()) for k in d)
    return moved / sum(int(where[k].sum()) for k in d)


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_bf16_compute_step_at_lr_1e6_moves_fp32_masters_like_an_fp32_step(
    backend, ray_session, tiny_model_dir, tmp_path
):
    cfg = bf16_cfg(tiny_model_dir, backend, generator_ranks=2)
    batch = make_token_batch(seed=3, n=6)
    ref = ReferenceTrainer(tiny_model_dir, bf16_cfg(tiny_model_dir, backend, dtype="float32"))
    start = ref.params()
    ref.sft(batch)  # the fp32 reference step: plain torch AdamW, fp32 everywhere
    want = deltas(ref.params(), start)
    moved_in_fp32 = {k: v != 0 for k, v in want.items()}

    group = GeneratorGroup(cfg)
    try:
        init = group.full_params()
        assert all(t.dtype == torch.float32 for t in init.values())  # fp32 masters
        group.train_sft(batch)
        masters = group.full_params()
        got = deltas(masters, init)

        # essentially every weight the fp32 step moves moves here too, by a step of size ~lr
        assert moved_fraction(got, moved_in_fp32) > 0.99
        close = sum(int(((got[k] - want[k]).abs() <= 0.1 * LR).sum()) for k in got)
        assert close / sum(v.numel() for v in got.values()) > 0.95
        # bf16 masters would have lost the step: rounding each master to bf16 undoes it
        rounded = {k: v.to(torch.bfloat16).double() for k, v in masters.items()}
        kept = sum(int((rounded[k] != init[k].to(torch.bfloat16).double()).sum()) for k in got)
        assert kept / sum(int(m.sum()) for m in moved_in_fp32.values()) < 0.05

        # a checkpoint round trip keeps the fp32 masters (not their bf16 rounding)
        group.save_checkpoint(str(tmp_path / "ckpt"))
        group.train_sft(make_token_batch(seed=4, n=6))
        group.load_checkpoint(str(tmp_path / "ckpt"))
        for k, v in group.full_params().items():
            torch.testing.assert_close(v, masters[k], rtol=0, atol=0, msg=k)

        # the rollout workers receive the compute dtype: bf16, the masters rounded
        worker = ray.remote(HFRolloutWorker).remote(
            str(tiny_model_dir), RolloutConfig(backend="hf"), "bfloat16", 64, 0
        )
        stats = group.sync_weights([worker])
        tied = masters["model.embed_tokens.weight"].numel()  # sent again as lm_head.weight
        assert stats["bytes"] == 2 * (sum(v.numel() for v in masters.values()) + tied)
        received = ray.get(worker.__ray_call__.remote(lambda w: dict(w.model.named_parameters())))
        for k, v in masters.items():
            assert received[k].dtype == torch.bfloat16, k
            torch.testing.assert_close(received[k].float(), v.to(torch.bfloat16).float(), msg=k)

        # the HF export loads in the configured dtype
        group.save_pretrained(str(tmp_path / "hf"))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
        assert hf.dtype == torch.bfloat16
        for k, p in hf.named_parameters():
            torch.testing.assert_close(p.detach(), masters[k].to(torch.bfloat16), msg=k)
    finally:
        group.shutdown()


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_bf16_discriminator_bt_step_at_lr_1e6_moves_its_fp32_masters(
    backend, ray_session, tiny_model_dir
):
    group = DiscriminatorGroup(bf16_cfg(tiny_model_dir, backend))
    try:
        init = group.full_params()
        assert all(t.dtype == torch.float32 for t in init.values())
        teacher, student = make_token_batch(seed=5, n=2), make_token_batch(seed=6, n=4)
        group.train_bt(teacher, student, torch.tensor([0, 0, 1, 1]))
        d = deltas(group.full_params(), init)
        # every parameter tensor moves (the unused embedding rows have no gradient)
        assert all(bool((v != 0).any()) for k, v in d.items() if "embed" not in k)
        assert all(float(v.abs().max()) < 2 * LR for v in d.values())  # a step of size ~lr
    finally:
        group.shutdown()
