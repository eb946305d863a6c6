"""The memory plan with LoRA: the 7B one-GPU preset against a hand computation, one base for G,
D and the reference with ``learner.shared_base``, and LoRA configs the schema refuses."""

import pytest

from gad_ray.config.schema import ConfigError, LoraSpec
from gad_ray.hydra_app import compose
from gad_ray.models.shapes import SHIPPED_SHAPES
from gad_ray.plan import check_fits, make_plan
from gad_ray.plan.lora import adapter_params

GiB = 2**30
PRESET = "experiment=qwen2.5-7b-lora_1gpu"


def test_adapter_params_of_qwen25_7b_rank_32_by_hand():
    # hidden 3584, 28 heads x 128, 4 KV heads x 128, MLP 18944, 28 layers
    h, q, kv, i = 3584, 3584, 512, 18944
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i)
    shape = SHIPPED_SHAPES["Qwen/Qwen2.5-7B-Instruct"]
    assert adapter_params(shape, LoraSpec(rank=32)) == 32 * 28 * per_layer == 80_740_352
    attn = LoraSpec(rank=8, target_modules=["q_proj", "v_proj"])
    assert adapter_params(shape, attn) == 8 * 28 * ((h + q) + (h + kv))


def test_7b_lora_preset_fits_one_80gb_gpu_by_hand():
    cfg = compose([PRESET])
    assert cfg.learner.shared_base and cfg.cluster.gpus_per_node == 1
    check_fits(cfg)
    plan = make_plan(cfg)
    (gpu,) = plan.gpus
    a, a_d = 80_740_352, 80_740_352 + 3584  # D: adapter + scalar head
    p = SHIPPED_SHAPES["Qwen/Qwen2.5-7B-Instruct"].params
    base = 2 * p  # bf16, held once (shared by G, D and the KL reference)
    states = 12 * a + 4 * a + 12 * a_d  # G's masters + Adam, the reference adapter, D's
    terms = gpu.terms
    assert terms["G frozen base, 2 B x 7.62B / 1"]["G update"] == base
    assert not any("D frozen base" in t for t in terms)  # no second base for D
    assert not any("gathered weights" in t or "fp32 master weights" in t for t in terms)
    resident = base + states
    assert gpu.total("generate") == pytest.approx(0.6 * 80 * GiB + resident + 1.5 * GiB)
    for phase in ("D update", "G update"):
        assert gpu.total(phase) > resident  # the base stays on the GPU for both learners
    peak = max(gpu.total(ph) for ph in plan.phases)
    assert peak <= 80 * GiB
    # the same model fully fine-tuned on one GPU: 16 B per parameter for G alone
    full = make_plan(compose([PRESET, "model=qwen2.5-7b", "learner.shared_base=false"]))
    assert full.problems and "G update" in " ".join(full.problems)


def test_shared_base_runs_one_learner_process():
    shared = make_plan(compose([PRESET]))
    separate = make_plan(compose([PRESET, "learner.shared_base=false"]))
    (s,), (d,) = shared.gpus, separate.gpus
    overhead = "CUDA context, NCCL, allocator: 1.5 GiB per process"
    assert s.terms[overhead]["G update"] == 2 * 1.5 * GiB  # vLLM (asleep) + the shared learner
    assert d.terms[overhead]["G update"] == 3 * 1.5 * GiB
    assert any(t.startswith("D frozen base") for t in d.terms)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["learner.shared_base=true"], "LoRA on both"),
        (
            [
                "model.student.lora.rank=8",
                "model.discriminator.lora.rank=8",
                "learner.shared_base=true",
                "learner=deepspeed",
            ],
            "learner.backend=fsdp",
        ),
        (["model.discriminator.lora.rank=8", "model.discriminator.lora.dropout=0.1"], "dropout 0"),
    ],
)
def test_impossible_lora_configs_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides)
