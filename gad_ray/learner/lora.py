"""LoRA adapters (``peft``) over one frozen base: building, switching, naming, merging, export.

With ``model.*.lora.rank > 0`` a learner trains low-rank adapters ``W + (alpha / r) B A`` on the
base's linear layers instead of the weights (docs/lora.md). The base is frozen and
held in the compute dtype; the adapters (and D's scalar head) are the trained fp32 masters.

One base may carry several named adapters (:data:`GENERATOR`, :data:`REFERENCE`,
:data:`DISCRIMINATOR`); :class:`AdapterModel` is the root module of such a stack and runs one
adapter per call (``forward(..., adapter=...)``), the LM head for G and its reference, the
scalar head at the last response token for D. The KL reference is the base plus a frozen copy
of G's adapter (equal to G's until :func:`reset_reference` re-copies it at the start of GAD):
the warmed-up student, as in full fine-tuning (docs/algorithms.md §2.4), for the price of one
more adapter instead of a second copy of the model.

Adapter tensors travel and are saved under peft's own names (``base_model.model.<module>.
lora_A.weight``, the names of ``adapter_model.safetensors``), which vLLM's LoRA loader and
``peft.PeftModel.from_pretrained`` read.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from gad_ray.config.schema import LoraSpec
from gad_ray.models.adapter_files import (
    save_adapter,
    write_base_pointer,
)
from gad_ray.models.loading import resolve_model_path
from gad_ray.models.score_head import head_scores

GENERATOR, REFERENCE, DISCRIMINATOR = "generator", "reference", "discriminator"


def peft_config(spec: LoraSpec) -> LoraConfig:
    """peft's config of ``spec`` (no bias adapters: vLLM serves none)."""
    targets = spec.target_modules
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
    )


def add_adapters(model: nn.Module, specs: dict[str, LoraSpec], seed: int) -> PeftModel:
    """``model`` (frozen) wrapped by peft with one adapter per ``specs`` entry, in order; every
    adapter is trainable (freeze one with ``requires_grad_(False)`` on its parameters). Each
    adapter's A is drawn (peft's init; B = 0) from ``seed`` and its name only, so the same
    adapter starts the same on a base of its own or a shared one."""
    model.requires_grad_(False)
    peft = None
    for name, spec in specs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + zlib.crc32(name.encode()))
            if peft is None:
                peft = get_peft_model(model, peft_config(spec), adapter_name=name)
            else:
                peft.add_adapter(name, peft_config(spec))
    for layer in tuner_layers(peft):  # add_adapter leaves only the first one trainable
        for name in specs:
            for d in (layer.lora_A, layer.lora_B):
                if name in d:
                    d[name].requires_grad_(True)
        layer._active_adapter = [next(iter(specs))]
    return peft


def tuner_layers(model: nn.Module) -> Iterator[BaseTunerLayer]:
    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


@contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run the body with adapter ``name`` the only active one. peft's ``set_adapter`` would also
    flip ``requires_grad`` (freezing the other adapters, unfreezing the reference), so this sets
    the layers' active adapter alone."""
    layers = list(tuner_layers(model))
    with _activated(layers, [[name] for _ in layers]):
        yield


@contextmanager
def _activated(layers: list[BaseTunerLayer], active: list[list[str]]) -> Iterator[None]:
    """Run the body with ``layers[i]``'s active adapters ``active[i]``, then restore them."""
    before = [layer._active_adapter for layer in layers]
    for layer, names in zip(layers, active, strict=True):
        layer._active_adapter = names
    try:
        yield
    finally:
        for layer, old in zip(layers, before, strict=True):
            layer._active_adapter = old


def recompute_with_forward_adapter(model: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """``torch.utils.checkpoint``'s ``context_fn`` for a model with several adapters: each
    checkpointed layer is recomputed in backward with the adapters that were active in ITS
    forward. Without it the recomputation runs with whatever is active when backward runs (the
    default adapter, G's, once D's call has returned), and D's gradients come out of G's
    adapter (docs/lora.md)."""
    layers = list(tuner_layers(model))

    def contexts() -> tuple[Any, Any]:  # called in the forward of each checkpointed layer
        active = [layer._active_adapter for layer in layers]
        return nullcontext(), _activated(layers, active)

    return contexts


def is_adapter_param(name: str, adapter: str) -> bool:
    """Whether parameter ``name`` (any prefix) belongs to adapter ``adapter``."""
    return f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_base_param(name: str) -> bool:
    """Whether ``name`` is a weight of the peft-wrapped base (not an adapter, not D's head)."""
    return "base_model.model." in name and not is_lora_param(name)


def peft_key(name: str, adapter: str) -> str:
    """peft's saved name of adapter parameter ``name`` (``base_model.model.<module>.lora_A.
    weight``): the part from ``base_model.`` on, without the adapter's name."""
    key = name[name.index("base_model.") :]
    return key.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B.")


def relative_key(key: str) -> str:
    """An adapter key from ``layers.`` on: the same for a causal LM's stack and D's backbone."""
    return "layers." + key.split(".layers.", 1)[1]


def base_name(name: str) -> str:
    """The plain HF name of a base parameter of a peft-wrapped model (``model.layers.0.mlp.
    down_proj.weight``): the part after ``base_model.model.``, without ``.base_layer``."""
    return name.split("base_model.model.", 1)[1].replace(".base_layer.", ".")


def scaling(spec: LoraSpec) -> float:
    return spec.alpha / spec.rank


def merge(
    base: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    spec: LoraSpec,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """``base`` (plain HF names) with the adapter (peft keys) merged in: ``W + (alpha / r) B A``,
    computed in fp32 and returned in each weight's dtype; ``prefix`` is put before a module's
    peft name to give its HF name (``model.`` for D's backbone in a classifier)."""
    out = dict(base)
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = prefix + key.split("base_model.model.", 1)[1].split(".lora_A.", 1)[0]
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        w = out[f"{module}.weight"]
        out[f"{module}.weight"] = (w.float() + scaling(spec) * (b.float() @ a.float())).to(w.dtype)
    return out


def split_state(
    state: dict[str, torch.Tensor], adapter: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A peft-wrapped model's full state as (base weights under plain HF names, ``adapter``'s
    weights under peft keys, the other trained weights (D's head) as they are)."""
    base, lora, other = {}, {}, {}
    for name, t in state.items():
        if is_adapter_param(name, adapter):
            lora[peft_key(name, adapter)] = t
        elif is_base_param(name):
            base[base_name(name)] = t
        elif not is_lora_param(name):
            other[name] = t
    return base, lora, other


def adapter_config(model: nn.Module, adapter: str, base_path: str) -> dict[str, Any]:
    """``adapter_config.json`` of ``adapter`` (target modules resolved to names), as peft
    writes it; what vLLM and ``PeftModel.from_pretrained`` read."""
    peft = next(m for m in model.modules() if isinstance(m, PeftModel))
    config = peft.peft_config[adapter].to_dict()
    config["base_model_name_or_path"] = base_path
    config["inference_mode"] = True
    return json.loads(json.dumps(config, default=sorted))  # sets -> sorted lists


class AdapterModel(nn.Module):
    """A causal LM with named LoRA adapters (``lm``, a ``PeftModel``) and, when D shares the
    base, D's scalar head (``score``). The root module the engines shard and train."""

    def __init__(self, lm: PeftModel, score: nn.Linear | None = None) -> None:
        super().__init__()
        self.lm, self.score = lm, score
        self.config = lm.get_base_model().config
        self._no_split_modules = list(lm.get_base_model()._no_split_modules or [])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        adapter: str = GENERATOR,
        use_cache: bool = False,
        response_mask: torch.Tensor | None = None,
        last_index: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        """With ``adapter`` active: D's scores [B] for :data:`DISCRIMINATOR` (the backbone's last
        hidden state through ``score``), else the causal LM's output (``.logits``, for the last
        ``logits_to_keep`` positions when > 0, or those it lists). Packed sequences:
        ``position_ids``, no ``attention_mask`` (:mod:`gad_ray.learner.packing`)."""
        with active_adapter(self.lm, adapter):
            if adapter == DISCRIMINATOR:
                backbone = self.lm.get_base_model().model
                out = backbone(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                )
                return head_scores(out.last_hidden_state, self.score, response_mask, last_index)
            return self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint each decoder layer; its recomputation in backward runs with the adapter
        of its own forward (:func:`recompute_with_forward_adapter`)."""
        kwargs = {"use_reentrant": False, "context_fn": recompute_with_forward_adapter(self.lm)}
        self.lm.get_base_model().gradient_checkpointing_enable(kwargs)


def copy_adapter(model: nn.Module, src: str, dst: str) -> None:
    """Copy adapter ``src``'s weights into adapter ``dst`` (an unsharded model)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if is_adapter_param(name, dst):
                p.copy_(params[adapter_pair(name, dst, src)])


def adapter_pair(name: str, adapter: str, other: str) -> str:
    """The name of ``other``'s parameter at the place of ``adapter``'s parameter ``name``."""
    return name.replace(f".lora_A.{adapter}.", f".lora_A.{other}.").replace(
        f".lora_B.{adapter}.", f".lora_B.{other}."
    )


def export_lora(
    path: str,
    state: dict[str, torch.Tensor],
    adapter: str,
    spec: LoraSpec,
    config: dict[str, Any],
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase,
    hf_config: PretrainedConfig | None = None,
    model_cls: type = AutoModelForCausalLM,
    prefix: str = "",
) -> None:
    """Export ``adapter`` of a peft-wrapped model's full ``state`` in ``dtype``, per
    ``spec.export``: ``merged``, a plain HF model of ``hf_config`` (default: the base's) with
    ``W + (alpha / r) B A``; ``adapter``, peft's adapter directory (``config``), a pointer to
    the base and the other trained weights (D's head) in ``trained.safetensors``. ``prefix``:
    see :func:`merge`. Call on one rank."""
    from safetensors.torch import save_file

    from gad_ray.learner.checkpoint import export_hf

    base, lora, other = split_state(state, adapter)
    if spec.export == "merged":
        base = {prefix + k: v for k, v in base.items()}
        merged = merge(base, lora, spec, prefix) | other
        merged = {k: v.to(dtype) for k, v in merged.items()}
        base_path = config["base_model_name_or_path"]
        hf_config = hf_config or AutoConfig.from_pretrained(resolve_model_path(base_path))
        export_hf(path, merged, hf_config, tokenizer, model_cls, base=base_path)
        return
    save_adapter(path, {k: v.to(dtype) for k, v in lora.items()}, config)
    if other:
        save_file(
            {k: v.to(dtype).contiguous() for k, v in other.items()}, f"{path}/trained.safetensors"
        )
    write_base_pointer(path, config["base_model_name_or_path"], {adapter: spec})
    tokenizer.save_pretrained(path)
