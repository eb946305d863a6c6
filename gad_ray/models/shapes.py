"""Model shapes for the memory plan (:mod:`gad_ray.plan`): from a model's config, or shipped.

The plan needs a decoder's shape, not its weights: hidden size, layers, attention and KV heads,
MLP width, vocabulary, tied embeddings. :func:`model_shape` reads them from the shapes shipped
below for the preset students (so planning needs no hub), else from the model's
``config.json`` (a local directory, a built ``tiny:`` model, or the hub / HF cache).

Parameter counts follow the dense decoder layout of Qwen2 / Llama (:attr:`ModelShape.params`);
the shipped shapes reproduce the published counts (Qwen2.5-7B-Instruct: 7.62B, 0.5B: 0.49B).
"""

from __future__ import annotations

from dataclasses import dataclass

from gad_ray.models.loading import TINY_PREFIX, ModelLoadError, resolve_model_path


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder-only LM with a gated (SwiGLU) MLP and RMSNorm, Qwen2 / Llama style."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # the LM head shares the embedding matrix
    max_context: int | None = None  # max_position_embeddings
    head_dim: int | None = None  # None: hidden // heads
    qkv_bias: bool = True  # Qwen2: the q, k, v projections have biases
    o_bias: bool = False  # Llama ``attention_bias``: q, k, v and o have biases

    @property
    def dh(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dh

    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o projections (+ biases), gate/up/down, two norms."""
        h, q, kv = self.hidden, self.heads * self.dh, self.kv_dim
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        return attn + 3 * h * self.intermediate + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """What is not in a decoder layer: embeddings, the LM head unless tied, the final norm."""
        return self.embed_params * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def discriminator_root_params(self) -> int:
        """The discriminator's root: embeddings, final norm and the scalar head (no LM head)."""
        return self.embed_params + 2 * self.hidden

    @property
    def discriminator_params(self) -> int:
        """Backbone + ``Linear(hidden, 1)``: the student without its LM head, plus the head."""
        return self.layers * self.layer_params + self.discriminator_root_params


def _qwen25(hidden, layers, heads, kv_heads, inter, vocab, tied) -> ModelShape:
    return ModelShape(hidden, layers, heads, kv_heads, inter, vocab, tied, max_context=32768)


# config.json of each Qwen2.5 Instruct model (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings); head_dim =
# hidden // heads (64 for 0.5B, 128 for the others), max_position_embeddings 32768
SHIPPED_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen25(896, 24, 14, 2, 4864, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen25(1536, 28, 12, 2, 8960, 151936, True),
    "Qwen/Qwen2.5-3B-Instruct": _qwen25(2048, 36, 16, 2, 11008, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": _qwen25(3584, 28, 28, 4, 18944, 152064, False),
    "Qwen/Qwen2.5-14B-Instruct": _qwen25(5120, 48, 40, 8, 13824, 152064, False),
}
_SHIPPED_LOWER = {name.lower(): shape for name, shape in SHIPPED_SHAPES.items()}


def shipped_shape(spec: str) -> ModelShape | None:
    """The shipped shape of a hub name (case-insensitive), or None."""
    return _SHIPPED_LOWER.get(spec.lower())


def shape_from_config(config) -> ModelShape:
    """The shape of a ``transformers`` config (a ``ForSequenceClassification`` one included)."""
    qwen2 = config.model_type == "qwen2"
    bias = bool(getattr(config, "attention_bias", False))
    heads = config.num_attention_heads
    return ModelShape(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        max_context=getattr(config, "max_position_embeddings", None),
        head_dim=getattr(config, "head_dim", None),
        qkv_bias=True if qwen2 else bias,
        o_bias=False if qwen2 else bias,
    )


def model_shape(spec: str) -> ModelShape:
    """The shape of a model spec: shipped (no hub), else read from its ``config.json``."""
    shape = shipped_shape(spec)
    if shape is not None:
        return shape
    from transformers import AutoConfig

    path = resolve_model_path(spec)  # builds a ``tiny:`` model once (cached)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        shipped = ", ".join(SHIPPED_SHAPES)
        raise ModelLoadError(
            f"model spec {spec!r}: no shape to plan with: not a shipped shape ({shipped}, or "
            f"{TINY_PREFIX}...) and its config.json is not readable ({e})"
        ) from e
    return shape_from_config(config)
