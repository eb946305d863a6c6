"""Packed micro-batches compute what padded ones do: log-probs, entropies, SFT / GRPO / Proxy-KD
losses and their gradients, D's scores and BT gradients, with LoRA adapters too, in fp32 with
gradient checkpointing on (as the presets train). In one process: the learners call these same
functions on each micro-batch (tests/learner/test_packing_groups.py runs them in groups)."""

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from gad_ray.algorithms import (
    aggregate_loss,
    bt_loss,
    kl_penalty,
    loss_denominator,
    ppo_clip_loss,
    sft_loss_mat,
)
from gad_ray.config.schema import LoraSpec
from gad_ray.data.batch import TokenBatch, make_batch
from gad_ray.discriminator.model import DiscriminatorModel, discriminator_config, new_head
from gad_ray.learner.lora import DISCRIMINATOR, GENERATOR, AdapterModel, add_adapters
from gad_ray.learner.packing import (
    attn_implementation,
    discriminator_scores,
    distill_loss,
    micro_batch,
    pack,
    policy_logprobs,
    topk_targets,
    use_packing,
)
from gad_ray.models.loading import load_causal_lm

CPU = torch.device("cpu")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def varied_batch(n: int = 7, seed: int = 0) -> TokenBatch:
    """Rows of very different lengths (prompts 1-12, responses 1-20 tokens)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    responses = [[rng.randrange(3, 2000) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    return make_batch(prompts, responses, pad_id=0)


def both(batch: TokenBatch):
    rows = list(range(len(batch)))
    return micro_batch(batch, rows, CPU, False), micro_batch(batch, rows, CPU, True)


def checkpointed_lm(path) -> torch.nn.Module:
    model = load_causal_lm(str(path), dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable({"use_reentrant": False})
    return model.train()


@contextmanager
def fed(model: torch.nn.Module) -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the input ids the forwards of ``model`` receive in the body."""
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        yield shapes
    finally:
        hook.remove()


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want) and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name, **TOL)


def test_pack_concatenates_real_tokens_with_restarting_positions():
    batch = make_batch([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    p = pack(batch)
    assert p.input_ids.tolist() == [[5, 6, 8, 9, 10, 7, 11]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert p.rows.tolist() == [0, 0, 0, 0, 0, 1, 1] and p.starts.tolist() == [0, 5]
    padded, packed = both(batch)
    assert (padded.computed_tokens(), packed.computed_tokens()) == (10, 7)


def test_packing_choice_follows_the_attention_implementation(tiny_model_dir):
    assert attn_implementation(load_causal_lm(str(tiny_model_dir))) == "sdpa"
    assert use_packing("auto", "flash_attention_2") and not use_packing("auto", "sdpa")
    assert use_packing(True, "sdpa") and use_packing(True, "eager")
    assert not use_packing(False, "flash_attention_2")
    with pytest.raises(ValueError, match=r"learner.packing=true: .*'paged_attention'"):
        use_packing(True, "paged_attention")


def test_packed_row_attends_within_each_sequence_only(tiny_model_dir):
    """The block-causal mask comes from the restarting position ids (transformers looks for them
    only without a KV cache: use_cache=False): plain positions 0..N-1 over the same packed row,
    or a cache, let later rows attend to earlier ones and change the result."""
    model = load_causal_lm(str(tiny_model_dir)).eval()
    padded, packed = both(varied_batch())
    p = packed.packed
    with torch.no_grad():
        want = model(**padded_inputs(padded), use_cache=False).logits[p.rows, p.cols]
        got = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits
        flat = model(input_ids=p.input_ids, use_cache=False).logits
        cached = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=True).logits
    torch.testing.assert_close(got[0], want, **TOL)
    assert (flat[0] - want).abs().max() > 1e-2 and (cached[0] - want).abs().max() > 1e-2


def padded_inputs(mb: TokenBatch) -> dict:
    return {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask}


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_policy_logprobs_sft_and_grpo_losses_and_gradients_equal_padded(
    tiny_model_dir, entropy_coef
):
    model, reference = checkpointed_lm(tiny_model_dir), load_causal_lm(str(tiny_model_dir))
    batch = varied_batch()
    padded, packed = both(batch)
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(mask.shape, generator=gen) * mask
    old_noise = 0.3 * torch.randn(mask.shape, generator=gen)
    den = loss_denominator(mask, "token-mean")

    def losses(mb):
        logp, ent = policy_logprobs(model, mb, 0.8, entropy=True, entropy_grad=bool(entropy_coef))
        sft = aggregate_loss(sft_loss_mat(policy_logprobs(model, mb)[0]), mask, "token-mean", den)
        old = (logp.detach() + old_noise) * mask
        pg_mat, _ = ppo_clip_loss(logp, old, adv, mask, 0.2, 0.2, 3.0)
        with torch.no_grad():
            ref, _ = policy_logprobs(reference, mb, 0.8)
        kl = aggregate_loss(kl_penalty(logp, ref, "low_var_kl"), mask, "token-mean", den)
        grpo = aggregate_loss(pg_mat, mask, "token-mean", den) + 0.1 * kl
        grpo = grpo - entropy_coef * aggregate_loss(ent, mask, "token-mean", den)
        return logp * mask, ent * mask, sft, grpo

    want = losses(padded)
    with fed(model) as shapes, fed(reference) as ref_shapes:
        got = losses(packed)
    assert set(shapes) == set(ref_shapes) == {(1, batch.num_tokens())}  # one packed row
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    assert float(want[3].detach()) != 0
    assert_grads_equal(grads(model, got[2]), grads(model, want[2]))  # SFT
    want, got = losses(padded), losses(packed)
    assert_grads_equal(grads(model, got[3]), grads(model, want[3]))  # GRPO


def test_discriminator_scores_and_bt_gradients_equal_padded(tiny_model_dir):
    model = DiscriminatorModel.from_pretrained(str(tiny_model_dir), seed=3)
    model.gradient_checkpointing_enable()
    model.train()
    teacher, student = varied_batch(3, seed=1), varied_batch(6, seed=2)
    pairs = torch.tensor([0, 0, 1, 1, 2, 2])

    def bt(packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t = discriminator_scores(model, micro_batch(teacher, [0, 1, 2], CPU, packed))
        s = discriminator_scores(model, micro_batch(student, list(range(6)), CPU, packed))
        return torch.cat([t, s]), bt_loss(t[pairs], s)[0]

    want_scores, want = bt(False)
    with fed(model.model) as shapes:
        got_scores, got = bt(True)
    assert shapes == [(1, teacher.num_tokens()), (1, student.num_tokens())]
    torch.testing.assert_close(got_scores, want_scores, **TOL)
    assert want_scores.std() > 0
    assert_grads_equal(grads(model, got), grads(model, want))


def test_lora_adapters_of_a_shared_base_equal_padded(tiny_model_dir):
    """G's adapter (log-probs, SFT gradients) and D's adapter + head (scores, BT gradients) on one
    checkpointed base, adapters made non-zero so they matter."""
    spec = LoraSpec(rank=4, alpha=8.0)
    base = load_causal_lm(str(tiny_model_dir))
    model = AdapterModel(add_adapters(base, {GENERATOR: spec, DISCRIMINATOR: spec}, seed=0))
    model.score = new_head(discriminator_config(model.config), seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    base.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.train()
    batch = varied_batch(5, seed=4)
    mask = batch.response_mask

    def run(packed: bool):
        mb = micro_batch(batch, list(range(5)), CPU, packed)
        logp, _ = policy_logprobs(lambda **kw: model(**kw, adapter=GENERATOR), mb)
        scores = discriminator_scores(lambda **kw: model(**kw, adapter=DISCRIMINATOR), mb)
        sft = aggregate_loss(sft_loss_mat(logp), mask, "token-mean")
        return logp * mask, scores, sft, bt_loss(scores[:2], scores[2:4])[0]

    want = run(False)
    with fed(base.model) as shapes:
        got = run(True)
    assert shapes == [(1, batch.num_tokens())] * 2  # G's forward and D's backbone
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    for i in (2, 3):  # SFT through G's adapter, BT through D's adapter and head
        g_grads = grads(model, run(True)[i])
        assert_grads_equal(g_grads, grads(model, run(False)[i]))
        assert any(".lora_" in n for n in g_grads)


def test_proxy_targets_and_distill_loss_equal_padded(tiny_model_dir):
    proxy, student = load_causal_lm(str(tiny_model_dir)), checkpointed_lm(tiny_model_dir)
    with torch.no_grad():  # a proxy that differs from the student
        for p in proxy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = varied_batch(6, seed=5)
    padded, packed = both(batch)
    keep = batch.response_mask
    with torch.no_grad(), fed(proxy) as shapes:
        want, got = topk_targets(proxy, padded, 5), topk_targets(proxy, packed, 5)
    assert shapes == [tuple(batch.input_ids.shape), (1, batch.num_tokens())]
    torch.testing.assert_close(got[0] * keep[..., None], want[0] * keep[..., None], **TOL)
    assert torch.equal(got[1] * keep[..., None].long(), want[1] * keep[..., None].long())
    torch.testing.assert_close(got[2] * keep, want[2] * keep, **TOL)
    weights = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.6])
    dens = loss_denominator(keep, "token-mean"), loss_denominator(keep, "seq-mean-token-mean")
    targets = want[0] * keep[..., None], want[1] * keep[..., None].long()
    loss_pad, m_pad = distill_loss(student, padded, *targets, weights, 0.5, *dens)
    loss_pack, m_pack = distill_loss(student, packed, *targets, weights, 0.5, *dens)
    torch.testing.assert_close(loss_pack, loss_pad, **TOL)
    assert m_pack["kd"] == pytest.approx(m_pad["kd"], rel=1e-5) and m_pad["kd"] > 0
    assert_grads_equal(
        grads(student, distill_loss(student, packed, *targets, weights, 0.5, *dens)[0]),
        grads(student, distill_loss(student, padded, *targets, weights, 0.5, *dens)[0]),
    )
