"""The moments of a learner step against hand-computed bytes: one decoder layer's saved tensors
per attention implementation, G's logits moments, the micro batches a padded batch makes."""

import pytest

from gad_ray.data.batch import make_batch
from gad_ray.models.shapes import ModelShape
from gad_ray.plan.learners import shapes_of
from gad_ray.plan.step import Learner, MicroBatch, layer_saved, moments, step_peak

# a small GQA decoder: h 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 1024, vocabulary 8192
SHAPE = ModelShape(256, 4, 4, 2, 1024, 8192, tied=False)
H, Q, KV, MLP, V = 256, 256, 128, 1024, 8192


def learner(kind="sft", c=2, key="G", **kw) -> Learner:
    p = SHAPE.params if key == "G" else SHAPE.discriminator_params
    root = SHAPE.root_params if key == "G" else SHAPE.discriminator_root_params
    return Learner(key, kind, 1, p, p, root, SHAPE, c, True, reference=kind == "grpo", **kw)


def test_one_layer_saved_per_attention_implementation():
    mb = MicroBatch(rows=4, length=300)
    t = 4 * 300
    # per token: 2 RMSNorms (fp32 input + 2 c-wide), q + k, v repeated to 4 heads (a mask is
    # passed), the output and its contiguous copy, gate/up/SiLU/product
    base = 2 * (4 + 2 * 2) * H + 2 * (3 * Q + 2 * Q) + 4 * 2 * MLP
    lse = 4 * 4 * t  # fp32 log-sum-exp per head
    mask = 2 * 4 * 300**2  # the boolean mask converted to bf16, [b, 1, t, t]
    assert layer_saved(learner(), mb, "sdpa", cuda=False) == base * t + lse + mask
    assert layer_saved(learner(), mb, "sdpa", cuda=True) == base * t + lse + 2 * mask
    # eager: the fp32 softmax and its bf16 copy, [b, heads, t, t]
    eager = base * t + (4 + 2) * 4 * 4 * 300**2
    assert layer_saved(learner(), mb, "eager", cuda=True) == eager
    # flash (packed rows on GPU): no mask, k and v at their own width
    flat = (2 * (4 + 2 * 2) * H + 2 * (Q + 2 * KV + 2 * Q) + 4 * 2 * MLP) * t + lse
    assert layer_saved(learner(), MicroBatch(1, t, masked=False), "flash", cuda=True) == flat
    # fp32 compute: every c-wide tensor doubles, the fp32 ones stay
    fp32 = (2 * (4 + 2 * 4) * H + 4 * (3 * Q + 2 * Q) + 4 * 4 * MLP) * t + lse + 4 * 4 * 300**2
    assert layer_saved(learner(c=4), mb, "sdpa", cuda=False) == fp32


def test_g_logit_moments_by_hand():
    # 3 rows, the LM head on 1500 positions: chunks of 1024 rows, the last one 476
    mb = MicroBatch(rows=3, length=600, logits=1500)
    by_name = {m.name: m for m in moments(learner("grpo"), mb, "sdpa", cuda=True)}
    assert list(by_name) == [
        "loss forward",
        "loss backward",
        "reference forward",
        "backward",
        "root reduce-scatter",
        "optimizer step",
    ]
    last = 476 * V
    logits = {
        "logits": 2 * 1500 * V,
        "flattened": 2 * 1500 * V,  # b > 1: flattening the shifted logits copies them
        "kept": 4 * 1500 * V,
        "entropy chunks": 12 * last,  # the entropy metric's 3 fp32 chunks > log-prob's 1
    }
    forward = by_name["loss forward"].terms
    assert forward["G logits, 2 B x 1500 x 8192"] == logits["logits"]
    assert forward["G flattened shifted logits, 2 B x 1500 x 8192"] == logits["flattened"]
    assert (
        forward["G fp32 log-softmax chunks kept for the backward, 4 B x 1500 x 8192"]
        == (logits["kept"])
    )
    assert forward["G fp32 entropy chunks in flight, 12 B x 1024 rows"] == logits["entropy chunks"]
    backward = by_name["loss backward"].terms
    assert backward["G fp32 gradients of a chunk, 12 B x 1024 rows"] == 12 * last
    # one row: the shifted logits flatten to a view; SFT: no entropy pass
    (sft_forward, *_) = moments(learner("sft"), MicroBatch(1, 1500), "sdpa", cuda=True)
    assert not any("flattened" in k for k in sft_forward.terms)
    assert sft_forward.terms["G fp32 chunk in flight, 4 B x 1024 rows"] == 4 * 476 * V
    # the entropy in the loss keeps its graph: 8 B per logit more
    grad = moments(learner("grpo", entropy_grad=True), mb, "sdpa", cuda=True)[0]
    assert grad.total - by_name["loss forward"].total == 8 * 1500 * V


def test_d_has_no_logits_and_gpu_adamw_keeps_a_temporary_per_parameter():
    d = learner("bt", key="D")
    names = [m.name for m in moments(d, MicroBatch(2, 100), "sdpa", cuda=True)]
    assert names == ["backward", "root reduce-scatter", "optimizer step"]
    opt = moments(d, MicroBatch(2, 100), "sdpa", cuda=True)[-1].terms
    p = SHAPE.discriminator_params
    assert opt == {
        f"D fp32 gradients, 4 B x {p / 1e6:.1f}M / 1": 4 * p,
        f"D AdamW foreach temporaries, 4 B x {p / 1e6:.1f}M / 1": 4 * p,
    }
    cpu = moments(d, MicroBatch(2, 100), "sdpa", cuda=False)[-1].terms
    assert cpu["D AdamW temporaries, 8 B x the largest tensor / 1"] == 8 * V * H
    # a tiny micro batch: the optimizer step is the peak
    assert step_peak(d, [MicroBatch(1, 8)], "sdpa", cuda=True).name == "optimizer step"


def test_micro_batch_shapes_of_a_padded_batch():
    batch = make_batch([[5] * 3, [5] * 7, [5] * 2], [[6] * 4, [6] * 2, [6] * 9], pad_id=0)
    # rows 0 and 2: lengths 7 and 11, shortest prompt 2 -> the LM head on 11 - 2 + 1 positions
    a, b, c = shapes_of(batch, [[0, 2], [1], []])
    assert a == MicroBatch(2, 11, 2 * 10, True)
    assert b == MicroBatch(1, 9, 9 - 7 + 1, False)  # one row: no padding, no mask
    assert c == MicroBatch(1, 7, 7 - 3 + 1, False)  # an empty micro batch runs row 0
    assert shapes_of(batch, [[0, 1, 2]], packed=True) == [MicroBatch(1, 7 + 9 + 11)]


@pytest.mark.parametrize("c", [2, 4])
def test_checkpointing_keeps_layer_inputs_not_layers(c):
    mb = MicroBatch(2, 512)
    on = {m.name: m.total for m in moments(learner(c=c), mb, "sdpa", cuda=True)}
    off_lr = Learner("G", "sft", 1, SHAPE.params, SHAPE.params, SHAPE.root_params, SHAPE, c, False)
    off = {m.name: m.total for m in moments(off_lr, mb, "sdpa", cuda=True)}
    layer = layer_saved(off_lr, mb, "sdpa", cuda=True)
    assert off["loss forward"] - on["loss forward"] == pytest.approx(
        SHAPE.layers * layer - SHAPE.layers * c * H * 1024
    )
