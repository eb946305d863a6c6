"""The memory plan's terms for a LoRA learner (docs/lora.md; :mod:`gad_ray.plan`).

With LoRA (``model.*.lora.rank`` r > 0) a learner rank holds, N ranks, P base parameters, A
adapter parameters (r x (in + out) of every adapted linear layer, plus D's scalar head), c the
compute dtype's bytes:

- the frozen base in the compute dtype: cP/N (cP under ZeRO-2, which does not partition frozen
  weights); with ``learner.shared_base`` only G counts it: D and the KL reference use the same;
- the adapters' fp32 masters and AdamW m and v: 12A/N;
- G's KL reference: a frozen fp32 copy of G's adapter, 4A/N (no second base).

In an update (:mod:`gad_ray.plan.step`, ``full=False``): fp32 gradients 4A/N; the base's root
and layers gathered as for full fine-tuning, once (the reference's forward re-gathers the same
base after the policy's, not beside it); only the adapters' gradients unsharded; activations
and logits as for full fine-tuning (the adapters' r-wide intermediates are r / h of a layer's
input, and frozen weights save less: an upper bound).
"""

from __future__ import annotations

from gad_ray.config.schema import LoraSpec
from gad_ray.models.shapes import ModelShape
from gad_ray.plan.units import count

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_params(shape: ModelShape, spec: LoraSpec) -> int:
    """LoRA parameters of ``spec`` on a Qwen2 / Llama decoder: r x (in + out) per adapted
    linear layer (``all-linear``: the seven of every decoder layer, not the LM head)."""
    h, q, kv, i = shape.hidden, shape.heads * shape.dh, shape.kv_dim, shape.intermediate
    dims = {
        "q_proj": h + q,
        "k_proj": h + kv,
        "v_proj": h + kv,
        "o_proj": q + h,
        "gate_proj": h + i,
        "up_proj": h + i,
        "down_proj": i + h,
    }
    targets = ALL_LINEAR if spec.target_modules == "all-linear" else spec.target_modules
    targets = [targets] if isinstance(targets, str) else targets
    return spec.rank * shape.layers * sum(dims.get(t, 0) for t in targets)


def lora_resident(
    key: str,
    n: int,
    base: int,
    adapter: int,
    c: int,
    reference: bool,
    holds_base: bool,
    zero2: bool,
) -> dict[str, float]:
    """What a LoRA learner rank holds on GPU between its steps (module docstring)."""
    out = {}
    if holds_base:
        shard = "" if zero2 else f" / {n}"
        out[f"{key} frozen base, {c} B x {count(base)}{shard}"] = c * base / (1 if zero2 else n)
    out[f"{key} LoRA fp32 masters + AdamW, 12 B x {count(adapter)} / {n}"] = 12 * adapter / n
    if reference:
        out[f"{key} KL reference: a copy of the adapter, 4 B x {count(adapter)} / {n}"] = (
            4 * adapter / n
        )
    return out
