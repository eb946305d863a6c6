"""The discriminator model (docs/algorithms.md §2.1): a causal-LM backbone plus a new linear head to one scalar.

``D(x, y)`` is the head's output at the LAST RESPONSE TOKEN (the final non-pad response token of
the right-padded row), with no sigmoid. Dropout is 0. The head computes in fp32 whatever the
compute dtype (:class:`ScoreHead`): a bf16 score would carry 8 significant bits, and GRPO
normalises the differences of a prompt's scores.

On disk a discriminator is a standard Hugging Face ``<Arch>ForSequenceClassification``
directory with ``num_labels=1`` (backbone under ``model.``, head ``score.weight``, no bias), so
``AutoModelForSequenceClassification`` can also read it; note that HF's own pooling picks the
last non-pad token of the whole row, which is the same position for right-padded rows. A plain
causal-LM directory (e.g. the student) gives the backbone and a freshly initialised head.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from gad_ray.config.schema import Config
from gad_ray.learner.checkpoint import export_hf
from gad_ray.models.loading import (
    ModelLoadError,
    check_same_tokenizer,
    load_tokenizer,
    model_max_context,
    resolve_model_path,
)
from gad_ray.models.score_head import ScoreHead, head_scores

_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "classifier_dropout", "resid_pdrop")


def discriminator_config(backbone_config: PretrainedConfig) -> PretrainedConfig:
    """The ``<Arch>ForSequenceClassification`` config (num_labels=1, dropout 0) of a backbone."""
    cfg = copy.deepcopy(backbone_config)
    arch = type(backbone_config).__name__.removesuffix("Config")
    cfg.architectures = [f"{arch}ForSequenceClassification"]
    cfg.num_labels = 1
    for key in _DROPOUT_KEYS:
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    return cfg


def new_head(config: PretrainedConfig, seed: int) -> ScoreHead:
    """A fresh fp32 :class:`ScoreHead` drawn from N(0, initializer_range) with ``seed``
    (independent of the global RNG)."""
    score = ScoreHead(config.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        score.weight.copy_(torch.randn(score.weight.shape, generator=gen) * std)
    return score


def is_discriminator_dir(config: PretrainedConfig) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


class DiscriminatorModel(nn.Module):
    """``model`` (the backbone) + ``score`` (``Linear(hidden, 1, bias=False)``)."""

    def __init__(self, backbone: nn.Module, score: ScoreHead, config: PretrainedConfig) -> None:
        super().__init__()
        self.model, self.score, self.config = backbone, score, config
        self._no_split_modules = list(getattr(backbone, "_no_split_modules", None) or [])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        response_mask: torch.Tensor | None = None,
        last_index: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [B]: the head at ``last_index`` (default: the last response token of each row);
        packed sequences: ``position_ids``, no ``attention_mask`` (:mod:`gad_ray.learner.packing`)."""
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return head_scores(hidden, self.score, response_mask, last_index)

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable({"use_reentrant": False})

    @classmethod
    def from_pretrained(
        cls,
        spec: str,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        head_dtype: torch.dtype | None = None,
        empty: bool = False,
    ) -> DiscriminatorModel:
        """Load a discriminator directory, or a causal LM's backbone plus a new head drawn from
        N(0, initializer_range) with ``seed`` (independent of the global RNG); the head in
        ``head_dtype`` (default ``dtype``). With ``empty``, the architecture only, on the meta
        device, no weight file read (a learner rank that receives rank 0's weights)."""
        head_dtype = head_dtype or dtype
        model_max_context(spec)  # raises ModelLoadError naming the spec when it cannot resolve
        path = resolve_model_path(spec)
        config = AutoConfig.from_pretrained(path)
        if empty:
            dconfig = discriminator_config(config)
            with torch.device("meta"):
                backbone = AutoModel.from_config(dconfig, dtype=dtype)
                head = ScoreHead(dconfig.hidden_size, head_dtype)
            return cls(backbone, head, dconfig)
        if is_discriminator_dir(config):
            full = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, num_labels=1
            )
            if not isinstance(getattr(full, "score", None), nn.Linear):
                raise ModelLoadError(f"{spec!r}: {type(full).__name__} has no linear `score` head")
            head = ScoreHead(full.config.hidden_size, head_dtype)
            with torch.no_grad():
                head.weight.copy_(full.score.weight)
            return cls(full.model, head, discriminator_config(full.config))
        dconfig = discriminator_config(config)
        backbone = AutoModel.from_pretrained(path, config=dconfig, dtype=dtype)
        return cls(backbone, new_head(dconfig, seed).to(head_dtype), dconfig)

    def save_pretrained(self, path: str, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write the HF ``ForSequenceClassification`` directory (+ tokenizer)."""
        export_hf(
            path, self.state_dict(), self.config, tokenizer, AutoModelForSequenceClassification
        )


def discriminator_source(cfg: Config) -> str:
    """The discriminator's model spec: ``model.discriminator.path``, ``student`` meaning the
    student's."""
    path = cfg.model.discriminator.path
    return cfg.model.student.path if path == "student" else path


def check_discriminator_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The shared tokenizer; raises ModelLoadError when the discriminator's differs from the
    student's (D scores the student's token ids)."""
    student = cfg.model.student
    student_tok = load_tokenizer(student.tokenizer or student.path)
    dspec = cfg.model.discriminator
    source = dspec.tokenizer or discriminator_source(cfg)
    if source != (student.tokenizer or student.path):
        check_same_tokenizer(
            student_tok,
            load_tokenizer(source),
            f"student ({student.tokenizer or student.path})",
            f"discriminator ({source})",
        )
    return student_tok
