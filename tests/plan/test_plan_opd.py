"""The memory plan counts on-policy distillation's frozen teacher (``teacher_model``): its rank is
placed on a GPU, its weights are resident (only in its own ``T forward`` phase when idle learners
offload), and that phase holds its logits; checked against a hand computation."""

import pytest

from gad_ray.hydra_app import compose
from gad_ray.plan import make_plan
from gad_ray.plan.report import format_plan
from gad_ray.plan.units import GiB

PROC = 1.5 * GiB
# Qwen2.5-1.5B-Instruct: hidden 1536, 28 layers, 12 query heads and 2 KV heads of 128, MLP 8960,
# vocabulary 151936, tied embeddings
H, LAYERS, MLP, VOCAB, KV = 1536, 28, 8960, 151936, 2 * 128
LAYER = (H * H + H) + 2 * (H * KV + KV) + H * H + 3 * H * MLP + 2 * H
P_TEACHER = LAYERS * LAYER + VOCAB * H + H
TOKENS = 8192


def _plan(*extra: str):
    return make_plan(
        compose(
            [
                "experiment=qwen2.5-1.5b_gpt5chat",  # one GPU, colocated
                "algorithm=opd",
                "model=qwen2.5-0.5b",
                "algorithm.opd.teacher.path=Qwen/Qwen2.5-1.5B-Instruct",
                "learner.max_tokens_per_micro_batch=8192",
                *extra,
            ]
        )
    )


def _teacher_terms(plan) -> dict[str, dict[str, float]]:
    return {k: v for k, v in plan.gpus[0].terms.items() if k.startswith("T ")}


def test_the_teacher_rank_and_its_memory_are_planned():
    assert P_TEACHER == 1_543_714_304  # the published 1.54B
    plan = _plan("learner.offload_idle=false")
    assert plan.phases == ("generate", "T forward", "G update")
    assert plan.gpus[0].actors == ["vLLM worker 0", "G rank 0", "teacher rank 0"]
    weights = 4 * P_TEACHER  # fp32 masters, 1 FSDP rank; no Adam state (it never steps)
    logits = TOKENS * VOCAB * (2 + 4)  # bf16 logits and their fp32 log-softmax
    terms = _teacher_terms(plan)
    assert sorted(terms) == [
        "T forward logits, 8192 tokens x 151936 x (2 + 4) B",
        "T frozen teacher fp32 master weights, 4 B x 1.54B / 1",
    ]
    masters = terms["T frozen teacher fp32 master weights, 4 B x 1.54B / 1"]
    assert masters == pytest.approx(dict.fromkeys(plan.phases, weights), rel=1e-12)
    assert terms["T forward logits, 8192 tokens x 151936 x (2 + 4) B"] == {"T forward": logits}
    overhead = plan.gpus[0].terms["CUDA context, NCCL, allocator: 1.5 GiB per process"]
    # generate: G and T (vLLM's own is in its share); else the sleeping vLLM too
    assert overhead == {"generate": 2 * PROC, "T forward": 3 * PROC, "G update": 3 * PROC}
    assert "teacher rank 0" in format_plan(plan)


def test_an_offloaded_teacher_is_resident_only_in_its_forward():
    plan = _plan("learner.offload_idle=true")
    masters = _teacher_terms(plan)["T frozen teacher fp32 master weights, 4 B x 1.54B / 1"]
    assert masters == {"T forward": 4 * P_TEACHER}
    assert plan.gpus[0].total("T forward") >= 4 * P_TEACHER + TOKENS * VOCAB * 6


def test_a_14b_teacher_resident_beside_vllm_does_not_fit_and_offloading_is_the_fix():
    big = "algorithm.opd.teacher.path=Qwen/Qwen2.5-14B-Instruct"
    plan = _plan("learner.offload_idle=false", big)
    assert len(plan.problems) == 1
    assert plan.problems[0].startswith("GPU 0 generate needs 120.5 GiB > 80.0 GiB")
    assert "set learner.offload_idle=true" in plan.problems[0]
    fixed = _plan("learner.offload_idle=true", big)
    assert fixed.problems == []
    assert fixed.gpus[0].total("T forward") > 55 * GiB  # 4 B x 14.8B of fp32 masters
