"""Model shapes for the plan: the shipped Qwen2.5 shapes and the parameter-count formula agree
with the real transformers modules (built on the meta device: no weights, no hub)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    Qwen2Config,
)

from gad_ray.models.loading import load_causal_lm
from gad_ray.models.shapes import SHIPPED_SHAPES, ModelShape, model_shape, shape_from_config


def _count(model) -> int:
    # a tied LM head is the embedding: count shared parameters once, like the formula
    return sum(p.numel() for p in model.parameters())


def _qwen2_config(s: ModelShape, **kw) -> Qwen2Config:
    return Qwen2Config(
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        vocab_size=s.vocab,
        tie_word_embeddings=s.tied,
        max_position_embeddings=s.max_context,
        **kw,
    )


# the parameter counts Qwen publishes for the Instruct models
PUBLISHED = {"0.5B": "0.49B", "1.5B": "1.54B", "3B": "3.09B", "7B": "7.62B", "14B": "14.77B"}


@pytest.mark.parametrize("name", sorted(SHIPPED_SHAPES))
def test_shipped_shapes_count_like_the_real_qwen2_modules(name):
    shape = SHIPPED_SHAPES[name]
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(_qwen2_config(shape))
        d = AutoModelForSequenceClassification.from_config(_qwen2_config(shape, num_labels=1))
    assert _count(lm) == shape.params
    assert _count(d) == shape.discriminator_params  # backbone + Linear(hidden, 1, bias=False)
    size = name.split("-")[1]
    assert f"{shape.params / 1e9:.2f}B".startswith(PUBLISHED[size].rstrip("B"))
    assert model_shape(name.lower()) == shape  # no hub: shipped, case-insensitive


def test_shape_from_config_counts_llama_with_attention_bias():
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(config)
    assert shape.qkv_bias and shape.o_bias and not shape.tied
    assert _count(model) == shape.params


def test_model_shape_reads_a_local_model_directory(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    assert shape.tied and shape.max_context == 2048
    assert _count(load_causal_lm(str(tiny_model_dir))) == shape.params
