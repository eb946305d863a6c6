"""The proxy learner (DPO, top-k targets) and the student's distillation step on real Ray +
gloo + FSDP2 (2 ranks, several micro-batches) match single-process reference steps."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from gad_ray.algorithms import dpo_loss, proxy_kd_loss, proxy_topk, seq_mean_logp
from gad_ray.data.batch import concat_batches, make_batch
from gad_ray.learner import GeneratorGroup
from gad_ray.learner.proxy import ProxyGroup, proxy_view
from gad_ray.models.tiny import build_tokenizer, model_config
from tests.config_builder import make_config

BETA, ALPHA, K = 0.5, 2.0, 5


def build_proxy(out: Path, layers: int = 3) -> Path:
    """A random proxy larger than ``tiny`` (more layers), sharing the tiny tokenizer."""
    tok = build_tokenizer()
    config = model_config("tiny", "qwen2", tok)
    config.num_hidden_layers = layers
    config.layer_types = ["full_attention"] * layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_cfg(student: Path, proxy: Path):
    optim = {"lr": 1e-3, "eps": 1e-6, "grad_clip": 1.0}
    return make_config(
        hydra=False,
        model__student__path=str(student),
        algorithm={
            "name": "proxy_kd",
            "generator_optim": optim,
            "proxy_kd": {
                "proxy": {"path": str(proxy)},
                "ranks": 2,
                "dpo_beta": BETA,
                "alpha": ALPHA,
                "top_k": K,
                "proxy_optim": optim,
            },
        },
        data={"train_path": "unused.jsonl", "max_prompt_length": 10, "max_response_length": 12},
        learner={"generator_ranks": 2, "micro_batch_size": 2, "max_tokens_per_micro_batch": 24},
    )


def seq_logps(model, batch, lh) -> torch.Tensor:
    logp, _ = lh.ref_logprobs(model, batch)
    return seq_mean_logp(logp, batch.response_mask)


@pytest.fixture(scope="module")
def runs(ray_session, tiny_model_dir, tmp_path_factory, lh):
    """topk / teacher log-lik / a distillation step / 2 DPO steps / reset + DPO, on 2 ranks."""
    cfg = make_cfg(tiny_model_dir, build_proxy(tmp_path_factory.mktemp("proxy")))
    chosen = lh.make_token_batch(seed=0, n=6)
    other = lh.make_token_batch(seed=1, n=6)  # its responses are the rejected ones
    prompts = [chosen.input_ids[i, : int(chosen.prompt_lens[i])].tolist() for i in range(6)]
    rejected = make_batch(prompts, [other.response_tokens(i) for i in range(6)], 0)
    weights = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1, 0.6])
    proxy, student = ProxyGroup(cfg), GeneratorGroup(cfg)
    try:
        out = {"plan": proxy.plan(concat_batches(chosen, rejected))}
        out["topk"] = proxy.topk(chosen, K)
        with pytest.raises(ValueError, match=r"top_k=9999 must be in \[1, 2048\]"):
            proxy.topk(chosen, 9999)
        out["distill"] = student.train_distill(chosen, *out["topk"][:2], weights, ALPHA)
        out["student_params"] = student.full_params()
        out["dpo"] = [proxy.train_dpo(chosen, rejected), proxy.train_dpo(chosen, rejected)]
        out["proxy_params"] = proxy.full_params()
        proxy.reset_reference()
        out["after_reset"] = proxy.train_dpo(chosen, rejected)
    finally:
        proxy.shutdown()
        student.shutdown()
    yield {"cfg": cfg, "chosen": chosen, "rejected": rejected, "weights": weights, **out}


def test_two_rank_plan_splits_pairs_over_micro_batches(runs):
    plan = runs["plan"]
    assert len(plan) == 2 and len(plan[0]) >= 2  # chosen and rejected rows land apart


def test_topk_and_token_logprobs_match_single_process(runs, lh):
    chosen, cfg = runs["chosen"], runs["cfg"]
    ref = lh.ReferenceTrainer(cfg.algorithm.proxy_kd.proxy.path, proxy_view(cfg))
    with torch.no_grad():
        logits = ref.model(input_ids=chosen.input_ids, attention_mask=chosen.attention_mask).logits
        top_logp, top_ids = proxy_topk(logits[:, :-1], K)
        want_loglik = seq_logps(ref.model, chosen, lh)
    keep = chosen.response_mask[:, 1:, None]
    got_logp, got_ids, got_tokens = runs["topk"]
    assert got_logp.shape == (*chosen.input_ids.shape, K)
    torch.testing.assert_close(got_logp[:, 1:], top_logp * keep, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_ids[:, 1:], top_ids * keep.long())
    assert (got_logp[:, 0] == 0).all() and (got_ids[chosen.response_mask == 0] == 0).all()
    torch.testing.assert_close(seq_mean_logp(got_tokens, chosen.response_mask), want_loglik)
    # renormalised over the k ids: each response position's top-k probabilities sum to 1
    sums = got_logp.exp().sum(-1)[chosen.response_mask.bool()]
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_distill_step_matches_single_process(runs, tiny_model_dir, lh):
    chosen, cfg = runs["chosen"], runs["cfg"]
    proxy = lh.ReferenceTrainer(cfg.algorithm.proxy_kd.proxy.path, proxy_view(cfg)).model
    ref = lh.ReferenceTrainer(tiny_model_dir, cfg)
    ids, mask = chosen.input_ids, chosen.response_mask
    with torch.no_grad():
        proxy_logits = proxy(input_ids=ids, attention_mask=chosen.attention_mask).logits[:, :-1]
    logits = ref.model(input_ids=ids, attention_mask=chosen.attention_mask).logits[:, :-1]
    loss, m = proxy_kd_loss(
        logits, proxy_logits, ids[:, 1:], mask[:, 1:], runs["weights"], ALPHA, K
    )
    want = {"ce": m["ce"], "kd": m["kd"], "loss": loss.item(), "grad_norm": ref._step(loss)}
    lh.assert_metrics_close(runs["distill"], want)
    assert want["kd"] > 0.01  # the KL term is not vacuous
    lh.assert_params_close(runs["student_params"], ref.params())


def test_dpo_steps_match_single_process_and_reference_resets(runs, lh):
    chosen, rejected, cfg = runs["chosen"], runs["rejected"], runs["cfg"]
    ref = lh.ReferenceTrainer(cfg.algorithm.proxy_kd.proxy.path, proxy_view(cfg))
    for got in runs["dpo"]:
        pc, pr = seq_logps(ref.model, chosen, lh), seq_logps(ref.model, rejected, lh)
        with torch.no_grad():
            rc, rr = seq_logps(ref.ref, chosen, lh), seq_logps(ref.ref, rejected, lh)
        loss, want = dpo_loss(pc, pr, rc, rr, BETA, 1.0)
        want |= {"loss": loss.item(), "chosen_logp": pc.mean().item()}
        want["grad_norm"] = ref._step(loss)
        lh.assert_metrics_close(got, want)
    first, second = runs["dpo"]
    assert first["reward_margin"] == pytest.approx(0, abs=1e-7)  # reference = initial proxy
    assert first["reward_accuracy"] == 0 and second["reward_margin"] > 0
    lh.assert_params_close(runs["proxy_params"], ref.params())
    after = runs["after_reset"]  # reference re-snapshotted: rewards are zero again
    assert after["chosen_reward"] == pytest.approx(0, abs=1e-7)
    assert after["rejected_reward"] == pytest.approx(0, abs=1e-7)
    assert after["chosen_logp"] > first["chosen_logp"]  # DPO + SFT raised log p(chosen)
