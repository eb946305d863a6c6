"""One base, several LoRA adapters, gradient checkpointing on (the 7B LoRA one-GPU preset):
each layer is recomputed in backward with the adapter of its own forward, so every adapter's
gradients equal those of the same steps without checkpointing. In one process, no sharding
(the group-level equality is in test_lora.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from gad_ray.config.schema import LoraSpec
from gad_ray.discriminator.model import discriminator_config, new_head
from gad_ray.learner.generator import policy_logprobs
from gad_ray.learner.lora import (
    DISCRIMINATOR,
    GENERATOR,
    REFERENCE,
    AdapterModel,
    add_adapters,
    is_adapter_param,
)
from tests.learner.conftest import make_token_batch

SPEC = LoraSpec(rank=4, alpha=8.0)


def adapter_model(model_dir, checkpointing: bool) -> AdapterModel:
    """G's, the reference's and D's adapters on one base, all NON-ZERO (peft starts B at 0,
    which would hide a recomputation with the wrong adapter in the B gradients' inputs)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    specs = {GENERATOR: SPEC, REFERENCE: SPEC, DISCRIMINATOR: SPEC}
    lm = add_adapters(base, specs, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            if is_adapter_param(name, REFERENCE):
                p.requires_grad_(False)
    model = AdapterModel(lm, new_head(discriminator_config(base.config), seed=0))
    if checkpointing:
        base.config.use_cache = False
        model.gradient_checkpointing_enable()
    return model.train()


def grads(model: AdapterModel, calls: list[str]) -> dict[str, torch.Tensor]:
    """The gradients of one backward through the ``calls`` (adapters, in order), as the
    learners make them: D's scores, G's log-probs, the reference's without gradient."""
    batch = make_token_batch(seed=0, n=4)
    loss = torch.zeros(())
    for adapter in calls:
        if adapter == DISCRIMINATOR:
            scores = model(
                batch.input_ids, batch.attention_mask, adapter, response_mask=batch.response_mask
            )
            loss = loss + torch.nn.functional.logsigmoid(scores).sum()
        elif adapter == GENERATOR:
            loss = (
                loss + policy_logprobs(lambda **kw: model(adapter=GENERATOR, **kw), batch)[0].sum()
            )
        else:
            with torch.no_grad():
                ref = policy_logprobs(lambda **kw: model(adapter=REFERENCE, **kw), batch)[0]
            loss = loss + 0.0 * ref.sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "calls",
    [
        [DISCRIMINATOR],  # D's BT step on the shared base: G's adapter is the default one
        [GENERATOR, REFERENCE],  # G's GRPO step: the reference's forward comes between
        [DISCRIMINATOR, GENERATOR],  # both in one graph: each layer recomputed with its own
    ],
)
def test_checkpointed_gradients_equal_plain_ones_per_adapter(tiny_model_dir, calls):
    assert adapter_model(tiny_model_dir, True).lm.get_base_model().is_gradient_checkpointing
    want = grads(adapter_model(tiny_model_dir, False), calls)
    got = grads(adapter_model(tiny_model_dir, True), calls)
    assert set(got) == set(want)
    for who in {GENERATOR, DISCRIMINATOR} & set(calls):
        names = [n for n in want if is_adapter_param(n, who)]
        assert names and all(float(want[n].abs().max()) > 0 for n in names), who  # not vacuous
    assert not any(is_adapter_param(n, REFERENCE) for n in got)  # frozen
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
