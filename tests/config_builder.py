"""The one place tests build a :class:`Config`: :func:`make_config`, and the two bases the tests
start from, a tiny CPU GAD run (:func:`tiny_run`, Hydra overrides, as `gad-train` takes them)
and a learner test's config (:func:`learner_config`, the schema's defaults)."""

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gad_ray.config.schema import Config
from gad_ray.hydra_app import compose
from gad_ray.validate import validate_config


def make_config(
    *overrides: str, hydra: bool = True, base: Config | None = None, **keys: Any
) -> Config:
    """A validated config from ``overrides`` (``key=value`` in Hydra's syntax; ``group=option``
    too when composed) and ``keys`` (the same by Python value, ``__`` for each dot:
    ``learner__backend="deepspeed"``; applied last, a dict replaces the whole node).

    Started from: ``hydra=True`` (default), ``gad_ray/conf`` composed as `gad-train` does it
    (the ``tiny_cpu`` experiment preset, ``model=small``: ``gad_ray/conf/config.yaml``), the
    model's context checked. ``hydra=False``, the schema's defaults alone (no preset), or
    ``base``, a config derived from; the model's context is then not checked (the learner,
    rollout and D tests' configs: the model may not exist)."""
    if hydra and base is None:
        cfg = compose(list(overrides))
        if not keys:
            return cfg
        raw, overrides = cfg.model_dump(), ()
    else:
        raw = {} if base is None else base.model_dump()
    if overrides:
        raw = OmegaConf.to_container(OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides))))
    for key, value in keys.items():
        *path, last = key.split("__")
        node = raw
        for name in path:
            node = node.setdefault(name, {})
        node[last] = value
    return validate_config(raw, check_model_context=hydra and base is None)


def tiny_run(run_dir: Path | str, *extra: str) -> list[str]:
    """The overrides of a GAD run small enough for CPU tests: the tiny model, 4 prompts x 2
    samples, 2 warmup + 2 GAD steps, a checkpoint every 2; ``extra`` come last (they win).
    For :func:`make_config` or a console script's arguments."""
    return [
        "model=tiny",
        "data.train_path='synthetic:train?n=16&seed=0'",
        "data.eval_path='synthetic:eval?n=8&seed=1'",
        "data.max_prompt_length=64",
        "data.max_response_length=12",
        "data.prompts_per_step=4",
        "algorithm.grpo.n_samples=2",
        "algorithm.warmup.epochs=0.5",
        "algorithm.warmup.d_only_steps=0",
        "algorithm.gad.steps=2",
        "learner.micro_batch_size=2",
        "rollout.kv_cache_memory_bytes=33554432",
        "trainer.save_every=2",
        "trainer.tensorboard=false",
        f"trainer.run_dir={run_dir}",
        *extra,
    ]


def learner_config(model_dir: Path | str, **learner: Any) -> Config:
    """A learner test's config (the schema's defaults, no preset): GAD on the model at
    ``model_dir`` with lr 1e-3 so one step visibly moves the weights, and Adam eps 1e-6 so that
    zero-in-theory gradients (e.g. attention key biases) carrying float noise do not get
    normalised into full-size steps that differ between summation orders; 4 prompts x 2
    samples of <= 10 + 12 tokens, micro-batches of 2. ``learner``: ``learner.*`` keys."""
    return make_config(
        hydra=False,
        model__student__path=str(model_dir),
        algorithm__name="gad",
        algorithm__grpo={"n_samples": 2, "kl_coef": 0.1, "dual_clip": 3.0},
        algorithm__generator_optim={
            "lr": 1e-3,
            "eps": 1e-6,
            "grad_clip": 1.0,
            "weight_decay": 0.01,
        },
        data__train_path="unused.jsonl",
        data__prompts_per_step=4,
        data__max_prompt_length=10,
        data__max_response_length=12,
        learner={"micro_batch_size": 2, **learner},
    )
