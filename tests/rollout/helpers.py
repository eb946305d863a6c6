"""Shared helpers for the rollout tests: reference log-probs and edited weights."""

import torch
from transformers import PreTrainedModel

from gad_ray.algorithms import token_logprobs
from gad_ray.rollout.types import Sample


def reference_logprobs(
    model: PreTrainedModel, prompt: list[int], sample: Sample, temperature: float = 1.0
) -> torch.Tensor:
    """The learner's recomputation: fp32 logits on prompt+response, ``token_logprobs`` at
    ``temperature``."""
    ids = torch.tensor([prompt + sample.token_ids])
    with torch.no_grad():
        logits = model(ids).logits.float()
    lps = token_logprobs(logits[:, :-1], ids[:, 1:], temperature)[0]
    return lps[len(prompt) - 1 :]


def perturbed(model: PreTrainedModel, scale: float = 0.05, seed: int = 1) -> None:
    """Add Gaussian noise to every parameter in place (a stand-in for a training step)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def force_eos(model: PreTrainedModel, eos_id: int, dim: int = 0) -> None:
    """Edit a tied-embedding model in place so that EOS is by far the likeliest next token.

    Residual-stream dimension ``dim`` is made a constant 1 (every embedding has 1 there and no
    layer writes to it); EOS's (tied) embedding has 1000 there, so its logit dominates.
    """
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, dim] = 1.0
        emb[eos_id, dim] = 1000.0
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p[dim, :] = 0.0
        model.model.norm.weight[dim] = 1.0
