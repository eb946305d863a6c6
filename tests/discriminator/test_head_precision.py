"""D's scores are fp32 under bf16 compute (the GPU presets), on FSDP2 and DeepSpeed ZeRO-2/3.

A bf16 score carries 8 significant bits (spacing 2^-6 near 3), and GRPO normalises the
differences of one prompt's scores. The head computes in fp32 (fp32 weight, input upcast), so
the scores resolve what bf16 cannot: almost none lies on the bf16 grid, and each equals the fp32
head over the bf16 backbone's hidden state computed in one process. The BT step's gradients
are those of that fp32 head (grad norm against the single-process step)."""

import pytest
import ray
import torch

from gad_ray.algorithms import bt_loss
from gad_ray.config.schema import validate_config
from gad_ray.discriminator import DiscriminatorGroup, DiscriminatorModel
from tests.learner.conftest import make_token_batch

PAIRS = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def bf16_cfg(model_dir, backend: str, zero: int, ranks: int):
    raw = {
        "model": {
            "student": {"path": str(model_dir), "dtype": "bfloat16"},
            "discriminator": {"dtype": "bfloat16"},
        },
        "algorithm": {
            "name": "gad",
            "grpo": {"n_samples": 2},
            "discriminator_optim": {"lr": 1e-3, "grad_clip": None, "weight_decay": 0.0},
        },
        "data": {"train_path": "unused.jsonl", "prompts_per_step": 4},
        "learner": {
            "backend": backend,
            "zero_stage": zero,
            "micro_batch_size": 2,
            "discriminator_ranks": ranks,
        },
    }
    return validate_config(raw, check_model_context=False)


def reference(model_dir, seed: int) -> DiscriminatorModel:
    """The same D in one process: the backbone in bf16 (what the learner computes with), the
    head's fp32 weight."""
    return DiscriminatorModel.from_pretrained(
        str(model_dir), dtype=torch.bfloat16, seed=seed, head_dtype=torch.float32
    )


def on_bf16_grid(x: torch.Tensor) -> torch.Tensor:
    return x == x.to(torch.bfloat16).float()


@pytest.mark.parametrize(
    ("backend", "zero", "ranks"), [("fsdp", 3, 2), ("deepspeed", 2, 2), ("deepspeed", 3, 1)]
)
def test_bf16_compute_scores_are_fp32_and_bt_gradients_those_of_the_fp32_head(
    backend, zero, ranks, tiny_model_dir, ray_session
):
    cfg = bf16_cfg(tiny_model_dir, backend, zero, ranks)
    ref = reference(tiny_model_dir, cfg.seed)
    teacher, student = make_token_batch(seed=5, n=3), make_token_batch(seed=6, n=6)
    batch = make_token_batch(seed=7, n=16)
    group = DiscriminatorGroup(cfg)
    try:
        init = group.full_params()
        torch.testing.assert_close(init["score.weight"], ref.score.weight.detach(), rtol=0, atol=0)
        scores = group.score(batch)
        metrics = group.train_bt(teacher, student, PAIRS)
    finally:
        group.shutdown()

    # fp32 resolution: a bf16 output would put every score on the bf16 grid
    assert scores.dtype == torch.float32
    assert float(on_bf16_grid(scores).float().mean()) < 0.25, scores
    with torch.no_grad():
        want = ref(batch.input_ids, batch.attention_mask, batch.response_mask)
    print(
        f"\n{backend} zero {zero}: |scores - reference| max {float((scores - want).abs().max()):.3g}"
    )
    # the same fp32 head over the same bf16 hidden states (shapes differ: bf16 kernel noise)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)

    # the BT step: its loss from fp32 scores, its gradient that of the fp32 head
    loss, want_metrics = bt_loss(
        ref(teacher.input_ids, teacher.attention_mask, teacher.response_mask)[PAIRS],
        ref(student.input_ids, student.attention_mask, student.response_mask),
    )
    loss.backward()
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.float().norm() for p in ref.parameters() if p.grad is not None])
    )
    print(f"grad norm {metrics['grad_norm']:.6g} vs reference {float(norm):.6g}")
    for k in ("d_loss", "teacher_score_mean", "student_score_mean"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-6), k
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-2)
