"""The memory plan against measurement: G's SFT step, G's GRPO step (with its KL reference) and
D's BT step run through the learner workers the presets run (FSDP2, gradient checkpointing,
fp32 masters with bf16 compute, micro batches planned by the learner group from an LMSYS-like
length mix of up to 512 tokens) on small Qwen2-shaped models, in this process on a one-rank
gloo group. Each step's peak of live tensor bytes (``TensorPeak``: the profiler's allocator
events on CPU) must lie within the plan's figure for the same micro batches
(``learner_step``): measured <= plan <= 1.25 x measured, in bf16 and in fp32 compute, with G
peaking in its loss forward and in its backward."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen2Config

from gad_ray.algorithms import bt_loss, loss_denominator
from gad_ray.data.batch import concat_batches, make_batch
from gad_ray.discriminator.learner import DiscriminatorWorker
from gad_ray.hydra_app import compose
from gad_ray.learner.generator import GeneratorWorker
from gad_ray.learner.group import LearnerGroup
from gad_ray.models.tiny import build_tokenizer
from gad_ray.plan.learners import learner_step, shapes_of
from gad_ray.plan.measure import TensorPeak

MiB = 2**20
# Qwen2-shaped, small: GQA (4 query heads, 2 KV heads), an untied LM head
DIMS = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=1024,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
)
# (compute dtype, vocabulary, learner.max_tokens_per_micro_batch, student rows): with 8192
# tokens G's logits, activations and states are each a good share of its peak (its loss forward
# is the largest moment); with the tokenizer's 2048 and twice the budget its backward is
CASES = {
    "bf16": ("bfloat16", 8192, 2048, 12),
    "fp32": ("float32", 8192, 2048, 12),
    "bf16, vocab 2048": ("bfloat16", 2048, 4096, 28),
}


@pytest.fixture(scope="module")
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def build_model(out, vocab: int):
    tok = build_tokenizer()
    ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = Qwen2Config(**DIMS, vocab_size=vocab, **ids, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def lmsys_like(n: int, seed: int):
    """Rows with log-normal prompt (median 80) and response (median 200) lengths, each capped
    at 256: sequences of up to 512 tokens, as the 7B preset's mix at a smaller scale."""
    g = torch.Generator().manual_seed(seed)

    def lengths(median: float) -> list[int]:
        draws = torch.randn(n, generator=g) * 0.6 + math.log(median)
        return [max(1, min(256, int(math.exp(x)))) for x in draws.tolist()]

    def ids(k: int) -> list[int]:
        return torch.randint(3, 2000, (k,), generator=g).tolist()

    return make_batch([ids(k) for k in lengths(80)], [ids(k) for k in lengths(200)], 0)


def micro_batches(cfg, batch) -> list[list[int]]:
    """The learner group's own micro-batch plan of ``batch`` for its one rank (padded, as
    the ranks compute under SDPA)."""
    return LearnerGroup.plan(SimpleNamespace(cfg=cfg, num_ranks=1, packing=False), batch)[0]


def measure(step) -> tuple[int, str]:
    """Peak live tensor bytes of the second call of ``step`` (the first allocates AdamW's
    state), and where it happened: the innermost op and the backward node running then."""
    step()
    peak = TensorPeak(torch.device("cpu"))
    peak.start()
    step()
    nbytes = peak.stop()
    backward = [w.split(": ")[-1] for w in peak.where if w.startswith("autograd::engine")]
    return nbytes, " in ".join(peak.where[:1] + backward[:1])


def g_steps(cfg, model_dir, batch, plan) -> dict:
    """G's SFT and GRPO steps: (measured bytes, the plan's moment) each."""
    gen = GeneratorWorker(cfg, 0, 1, "generator", 2, str(model_dir), True, None)
    gen.setup()
    den = loss_denominator(batch.response_mask, "token-mean")
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(2))[:, None]
    adv = adv * batch.response_mask
    tokens = float(batch.response_mask.sum())
    mbs = shapes_of(batch, plan)
    sft = measure(lambda: gen.train_sft(batch, plan, den))
    grpo = measure(lambda: gen.train_grpo(batch, plan, adv, None, den, tokens, 1.0))
    return {
        "G SFT": (sft, learner_step(cfg, "G", mbs, cuda=False, kind="sft")),
        "G GRPO": (grpo, learner_step(cfg, "G", mbs, cuda=False, kind="grpo")),
    }


def d_step(cfg, model_dir, teacher, student) -> tuple:
    """D's BT step (DiscriminatorGroup.train_bt's two passes, on this one rank)."""
    disc = DiscriminatorWorker(cfg, 0, 1, "discriminator", 2, str(model_dir), str(model_dir), None)
    disc.setup()
    both = concat_batches(teacher, student)
    plan = micro_batches(cfg, both)
    pairs = torch.arange(len(student)) // 2

    def bt_step() -> None:
        _, rows = disc.surrogate_values(both, plan)
        v = torch.stack(rows)[:, 0].double().requires_grad_(True)
        loss, _ = bt_loss(v[: len(teacher)][pairs], v[len(teacher) :], "mean")
        (coef,) = torch.autograd.grad(loss, v)
        disc.train_surrogate(both, plan, coef.float())

    return measure(bt_step), learner_step(cfg, "D", shapes_of(both, plan), cuda=False)


@pytest.fixture(scope="module", params=list(CASES))
def phases(request, one_rank, tmp_path_factory):
    """Per phase: (measured bytes, the plan's moment) for the same micro batches."""
    dtype, vocab, budget, rows = CASES[request.param]
    model_dir = build_model(tmp_path_factory.mktemp("qwen2-plan"), vocab)
    cfg = compose(
        [
            f"model.student.path={model_dir}",
            f"model.student.dtype={dtype}",
            f"model.discriminator.dtype={dtype}",
            "model.student.gradient_checkpointing=true",
            "model.discriminator.gradient_checkpointing=true",
            f"learner.max_tokens_per_micro_batch={budget}",
        ]
    )
    batch, teacher = lmsys_like(rows, seed=0), lmsys_like(rows // 2, seed=1)
    plan = micro_batches(cfg, batch)
    assert len(plan) >= 2  # gradients of earlier micro batches are held by later ones
    out = g_steps(cfg, model_dir, batch, plan) | {"D BT": d_step(cfg, model_dir, teacher, batch)}
    print(
        f"\n{request.param}: phase | plan MiB (its largest moment) | measured MiB (at) | "
        "plan / measured"
    )
    for name, ((measured, at), moment) in out.items():
        print(
            f"  {name} | {moment.total / MiB:.1f} ({moment.name}) | {measured / MiB:.1f} ({at}) | "
            f"{moment.total / measured:.3f}"
        )
    return {name: (measured, moment) for name, ((measured, _), moment) in out.items()}


@pytest.mark.parametrize("phase", ["G SFT", "G GRPO", "D BT"])
def test_each_phase_peak_is_measured_within_the_plan(phases, phase):
    measured, planned = phases[phase]
    assert measured <= planned.total <= 1.25 * measured, (
        f"{phase}: plan {planned.total / MiB:.1f} MiB ({planned.name}), measured "
        f"{measured / MiB:.1f} MiB:\n"
        + "\n".join(f"  {k}: {v / MiB:.2f}" for k, v in planned.terms.items())
    )
