"""The generator learner on real Ray + gloo + FSDP2 matches a single-process reference step."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from gad_ray.algorithms import broadcast_to_tokens
from gad_ray.data.batch import make_batch
from gad_ray.learner import GeneratorGroup, LearnerError
from gad_ray.models.loading import ModelLoadError

# the samples' temperature, passed with the batch; not learner_config's algorithm.grpo.temperature
# (0.8), so matching the reference at T shows the update computes its log-probs at T
T = 0.6


def _steps(group: GeneratorGroup, batch, adv, noise) -> dict:
    """logprobs (T=1 and T), SFT, GRPO with given old logprobs, on-policy GRPO; parameters."""
    assert group.cfg.algorithm.grpo.temperature != T
    out = {
        "logprobs": group.compute_logprobs(batch),
        "logprobs_t": group.compute_logprobs(batch, T),
    }
    out["sft"] = group.train_sft(batch)
    out["old"] = group.compute_logprobs(batch, T) + noise
    out["grpo"] = group.train_grpo(batch, adv, out["old"], temperature=T)
    out["grpo_on_policy"] = group.train_grpo(batch, adv, temperature=T)
    out["params"] = group.full_params()
    return out


@pytest.fixture(scope="module")
def runs(ray_session, tiny_model_dir, lh):
    """The same three steps on 2 ranks (token budget), 1 rank (micro-batch 1) and in-process."""
    batch = lh.make_token_batch(seed=0, n=6)
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(len(batch), generator=gen)
    noise = 0.3 * torch.randn(batch.input_ids.shape, generator=gen) * batch.response_mask
    two = GeneratorGroup(
        lh.learner_config(tiny_model_dir, generator_ranks=2, max_tokens_per_micro_batch=24)
    )
    one = GeneratorGroup(lh.learner_config(tiny_model_dir, generator_ranks=1, micro_batch_size=1))
    try:
        plan = two.plan(batch)
        results = {"two": _steps(two, batch, adv, noise), "one": _steps(one, batch, adv, noise)}
        ref = lh.ReferenceTrainer(tiny_model_dir, two.cfg)
        mask = batch.response_mask
        expect = {
            "logprobs": lh.ref_logprobs(ref.model, batch)[0].detach() * mask,
            "logprobs_t": lh.ref_logprobs(ref.model, batch, T)[0].detach() * mask,
        }
        expect["sft"] = ref.sft(batch)
        tokens_adv = broadcast_to_tokens(adv, batch.response_mask)
        expect["grpo"] = ref.grpo(batch, tokens_adv, results["two"]["old"], T)
        expect["grpo_on_policy"] = ref.grpo(batch, tokens_adv, None, T)
        expect["params"] = ref.params()
        yield {"batch": batch, "plan": plan, "expect": expect, "group": two, **results}
    finally:
        two.shutdown()
        one.shutdown()


def test_two_rank_plan_has_several_micro_batches_and_padding(runs):
    plan = runs["plan"]
    assert len(plan) == 2 and len(plan[0]) == len(plan[1]) >= 2
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(len(runs["batch"])))


def test_logprobs_match_single_process(runs):
    for key in ("logprobs", "logprobs_t"):
        want = runs["expect"][key]
        for who in ("two", "one"):
            got = runs[who][key]
            assert got.shape == runs["batch"].input_ids.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (runs["two"]["logprobs"][runs["batch"].response_mask == 0] == 0).all()


def test_logprobs_at_temperature_by_hand(runs, tiny_model_dir):
    """log p_T(y_t) = z_t[y_t] / T - logsumexp(z_t / T), from the model's raw logits z."""
    batch = runs["batch"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        z = model(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1]).logits
    t = int(batch.response_mask[0].nonzero()[0])  # the first response token of row 0
    y = int(batch.input_ids[0, t])
    zt = z[0, t - 1].double()
    by_hand = zt[y] / T - torch.log(torch.exp(zt / T).sum())
    got = runs["expect"]["logprobs_t"][0, t].double()  # the reference of the group's check
    assert float(got) == pytest.approx(float(by_hand), abs=1e-5)
    assert abs(float(by_hand) - float(runs["expect"]["logprobs"][0, t])) > 1e-3


def test_sft_step_matches_single_process(runs, lh):
    got = runs["two"]["sft"]
    lh.assert_metrics_close(got, runs["expect"]["sft"])
    assert got["lr"] == pytest.approx(1e-3) and got["tokens_per_s"] > 0


def test_grpo_steps_match_single_process(runs, lh):
    for step in ("grpo", "grpo_on_policy"):
        lh.assert_metrics_close(runs["two"][step], runs["expect"][step])
    off, on = runs["two"]["grpo"], runs["two"]["grpo_on_policy"]
    assert off["pg_clipfrac"] > 0 and off["kl"] > 0  # the checks are not vacuous
    assert on["pg_clipfrac"] == 0 and on["approx_kl"] == pytest.approx(0, abs=1e-7)
    lh.assert_params_close(runs["two"]["params"], runs["expect"]["params"])


def test_one_rank_micro_batch_one_equals_two_ranks_token_budget(runs, lh):
    for step in ("sft", "grpo", "grpo_on_policy"):
        lh.assert_metrics_close(runs["one"][step], runs["two"][step])
    lh.assert_params_close(runs["one"]["params"], runs["two"]["params"])


def test_batch_without_response_tokens_is_rejected_naming_the_method(runs):
    empty = make_batch([[5, 6, 7], [8, 9]], [[], []], pad_id=0)
    with pytest.raises(ValueError, match=r"GeneratorGroup\.train_grpo: .* no response tokens"):
        runs["group"].train_grpo(empty, torch.zeros(2), temperature=T)
    with pytest.raises(ValueError, match=r"GeneratorGroup\.train_sft: .* no response tokens"):
        runs["group"].train_sft(empty)


def test_misshapen_advantages_are_rejected(runs):
    batch = runs["batch"]
    with pytest.raises(ValueError, match=r"train_grpo: advantages has shape \(6, 3\)"):
        runs["group"].train_grpo(batch, torch.zeros(6, 3), temperature=T)


def test_reset_reference_makes_kl_zero(runs):
    group, batch = runs["group"], runs["batch"]
    assert group.train_grpo(batch, torch.ones(len(batch)), temperature=T)["kl"] > 0
    group.reset_reference()
    # after the reset the reference equals the policy, so the next on-policy step has KL 0
    assert group.train_grpo(batch, torch.ones(len(batch)), temperature=T)["kl"] == pytest.approx(
        0, abs=1e-7
    )


def test_wrong_model_path_is_named(ray_session, tmp_path, lh):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        GeneratorGroup(lh.learner_config(missing))


def test_worker_side_load_error_names_role_and_rank(ray_session, tmp_path, tiny_model_dir, lh):
    # a config.json that parses on the host but whose weights are missing: fails in the actor
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(LearnerError, match=r"generator learner rank 0 failed: .*broken"):
        GeneratorGroup(lh.learner_config(broken))
