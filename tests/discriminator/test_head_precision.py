"""D's scores are fp32 under bf16 compute (the GPU presets), on FSDP2 and DeepSpeed ZeRO-2/3.

A bf16 score carries 8 significant bits (spacing 2^-6 near 3), and GRPO normalises the
differences of one prompt's scores. The head computes in fp32 (fp32 weight, input upcast), so
the scores resolve what bf16 cannot: almost none lies on the bf16 grid (each would, with a bf16
head), and they are the single-process D's within the bf16 backbone's noise. The BT step's
loss and gradient norm are the single-process step's, within that noise."""

import pytest
import torch

from gad_ray.algorithms import bt_loss
from gad_ray.discriminator import DiscriminatorGroup, DiscriminatorModel
from tests.config_builder import make_config
from tests.learner.conftest import make_token_batch

PAIRS = torch.tensor([0, 0, 1, 1, 2, 2])


def bf16_cfg(model_dir, backend: str, zero: int, ranks: int):
    return make_config(
        hydra=False,
        model__student={"path": str(model_dir), "dtype": "bfloat16"},
        model__discriminator__dtype="bfloat16",
        algorithm={
            "name": "gad",
            "grpo": {"n_samples": 2},
            "discriminator_optim": {"lr": 1e-3, "grad_clip": None, "weight_decay": 0.0},
        },
        data={"train_path": "unused.jsonl", "prompts_per_step": 4},
        learner={
            "backend": backend,
            "zero_stage": zero,
            "micro_batch_size": 2,
            "discriminator_ranks": ranks,
        },
    )


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
        scores = group.score(batch)
        metrics = group.train_bt(teacher, student, PAIRS)
        step = group.full_params()["score.weight"] - init["score.weight"]
    finally:
        group.shutdown()

    with torch.no_grad():  # DeepSpeed's masters start from the bf16-cast weights: the head's too
        torch.testing.assert_close(init["score.weight"], ref.score.weight, rtol=1e-2, atol=0)
        ref.score.weight.copy_(init["score.weight"])
        want = ref(batch.input_ids, batch.attention_mask, batch.response_mask)
    loss, want_metrics = bt_loss(
        ref(teacher.input_ids, teacher.attention_mask, teacher.response_mask)[PAIRS],
        ref(student.input_ids, student.attention_mask, student.response_mask),
    )
    loss.backward()
    norm = float(
        torch.linalg.vector_norm(
            torch.stack([p.grad.float().norm() for p in ref.parameters() if p.grad is not None])
        )
    )
    # AdamW's first step is -lr * sign(gradient) (eps 1e-8, no decay): the head's gradient signs
    g = ref.score.weight.grad
    agree = float((torch.sign(step) == -torch.sign(g)).float().mean())
    big = g.abs() > g.abs().median()
    agree_big = float((torch.sign(step[big]) == -torch.sign(g[big])).float().mean())
    gap = float((scores - want).abs().max())
    on_grid = float(on_bf16_grid(scores).float().mean())
    print(
        f"\n{backend} zero {zero}: scores on the bf16 grid {on_grid:.2f}, |scores - reference| "
        f"max {gap:.3g} (std {float(want.std()):.3g}); d_loss {metrics['d_loss']:.6g} vs "
        f"{want_metrics['d_loss']:.6g}; grad norm {metrics['grad_norm']:.6g} vs {norm:.6g}; "
        f"head step signs agree {agree:.2f} (larger half {agree_big:.2f})"
    )
    # fp32 resolution: a bf16 output would put every score on the bf16 grid (an fp32 value
    # lands there by chance with probability 2^-16)
    assert scores.dtype == torch.float32 and on_grid < 0.25, scores
    # D's scores all the same: the reference's within the bf16 backbone's own noise (its
    # hidden states differ with the micro-batch shapes by a few 1e-2 here)
    assert gap < 0.1
    # the BT step's loss from those scores, and its gradient that of the fp32 head
    for k in ("d_loss", "teacher_score_mean", "student_score_mean"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=2e-2, abs=2e-2), k
    assert metrics["grad_norm"] == pytest.approx(norm, rel=5e-2)
