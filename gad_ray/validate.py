"""The whole check of a config, run at start by every entry point (the console scripts through
:mod:`gad_ray.hydra_app`, ``compose``, the memory plan): the schema's own checks
(:func:`gad_ray.config.schema.parse_config`), then what needs the layers above the schema: the
algorithm's recipe and its checks, the roles it runs, and the student's shape. It sits above
:mod:`gad_ray.recipes` and :mod:`gad_ray.models`, so the schema imports neither.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

from gad_ray import recipes
from gad_ray.config.schema import Config, ConfigError, parse_config
from gad_ray.models.loading import model_max_context
from gad_ray.models.shapes import shipped_shape


def validate_config(raw: dict[str, Any], check_model_context: bool = True) -> Config:
    """Validate a composed config (a plain dict): the schema (:func:`parse_config`), then the
    combinations (:func:`check_config`); raise :class:`ConfigError` naming keys and values.

    With ``check_model_context`` the student's context length is read from its config
    (a local directory or ``tiny:`` spec) and checked against prompt + response length.
    """
    cfg = check_config(parse_config(raw))
    if check_model_context:
        check_context(cfg)
    return cfg


def check_config(cfg: Config) -> Config:
    """``cfg`` if its keys combine into a run this code can do, else :class:`ConfigError` listing
    every problem (:func:`combination_problems`)."""
    problems = list(combination_problems(cfg))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return cfg


def combination_problems(cfg: Config) -> Iterator[str]:
    """Problems of the config as a whole: the algorithm's own checks (its recipe), batch
    divisibility, and combinations of keys that cannot run together; each names its keys."""
    alg, data, lrn = cfg.algorithm, cfg.data, cfg.learner
    try:
        recipe = recipes.build(cfg)
    except ValueError as err:
        yield str(err)
        return
    yield from recipes.check(cfg)
    roles = {r for rs in recipe.role_sets() for r in rs}
    n = max((s.sampling.params.n for s in recipe.stages if s.sampling), default=0)
    if lrn.max_tokens_per_micro_batch is None:
        batches = {
            "data.prompts_per_step": (data.prompts_per_step, lrn.generator_ranks, "generator")
        }
        if "discriminator" in roles:
            batches["data.prompts_per_step * algorithm.grpo.n_samples"] = (
                data.prompts_per_step * n,
                lrn.generator_ranks,
                "generator",
            )
            batches["data.prompts_per_step (discriminator)"] = (
                data.prompts_per_step,
                lrn.discriminator_ranks,
                "discriminator",
            )
        for key, (size, ranks, who) in batches.items():
            unit = ranks * lrn.micro_batch_size
            if size % unit:
                yield (
                    f"{key}={size} is not divisible by learner.{who}_ranks x "
                    f"learner.micro_batch_size = {ranks} x {lrn.micro_batch_size} = {unit}"
                )
    if lrn.max_tokens_per_micro_batch is not None:
        need = data.max_prompt_length + data.max_response_length
        if lrn.max_tokens_per_micro_batch < need:
            yield (
                f"learner.max_tokens_per_micro_batch={lrn.max_tokens_per_micro_batch} is smaller "
                f"than one sequence (data.max_prompt_length + data.max_response_length = {need})"
            )
    ds3 = lrn.backend == "deepspeed" and lrn.zero_stage == 3
    if lrn.offload_idle and ds3 and lrn.param_offload:
        yield (
            "learner.offload_idle=true with learner.backend=deepspeed, zero_stage=3 and "
            "learner.param_offload=true: DeepSpeed cannot move the states of an engine that "
            "offloads its parameters (they already live on CPU); drop one of the two, or use "
            "learner.backend=fsdp"
        )
    if cfg.teacher.source == "api":
        for key in ("base_url", "model"):
            if not getattr(cfg.teacher.api, key):
                yield f"teacher.api.{key} is required when teacher.source=api"
    trained = {"model.student": cfg.model.student, "model.discriminator": cfg.model.discriminator}
    if alg.proxy_kd.proxy is not None:
        trained["algorithm.proxy_kd.proxy"] = alg.proxy_kd.proxy
    for key, spec in trained.items():
        if spec.dtype == "float16":
            yield (
                f"{key}.dtype=float16: fp16 training needs loss scaling, which gad-ray does not "
                "do; use bfloat16 (fp32 master weights, bf16 compute)"
            )
    yield from lora_problems(cfg, roles)
    if cfg.trainer.wandb.project and importlib.util.find_spec("wandb") is None:
        yield (
            f"trainer.wandb.project={cfg.trainer.wandb.project!r} needs the wandb package, which "
            "is not installed: pip install 'gad-ray[wandb]' (or drop trainer.wandb.project)"
        )
    if cfg.cluster.gpus_per_node == 0 and cfg.rollout.weight_sync == "nccl":
        yield "rollout.weight_sync=nccl needs GPUs (cluster.gpus_per_node=0)"
    if cfg.cluster.placement == "colocated" and cfg.rollout.weight_sync == "nccl":
        yield (
            "rollout.weight_sync=nccl with cluster.placement=colocated: NCCL cannot broadcast "
            "between processes on the same GPU (use ipc, object_store or auto)"
        )
    overlapped = {
        "trainer.pipeline=one_step_off": cfg.trainer.pipeline == "one_step_off",
        "trainer.overlap_d_g=true": cfg.trainer.overlap_d_g is True,
    }
    for key in (k for k, on in overlapped.items() if on and cfg.cluster.gpus_per_node > 0):
        if cfg.cluster.placement == "colocated":  # docs/placement.md#rejected-combinations
            yield (
                f"{key} with cluster.placement=colocated on GPUs: it keeps vLLM awake while G "
                "trains, or G and D resident at once, on one GPU, and the memory plan has no "
                "such overlapped phase; use cluster.placement=disaggregated, or drop the overlap"
            )
    if cfg.rollout.weight_sync == "ipc" and cfg.cluster.gpus_per_node > 0:
        ranks, workers = cfg.learner.generator_ranks, cfg.rollout.num_workers
        if cfg.cluster.placement != "colocated" or workers > ranks:
            yield (
                f"rollout.weight_sync=ipc hands each rollout worker the weights on its own GPU: "
                f"it needs cluster.placement=colocated (got {cfg.cluster.placement}) and "
                f"rollout.num_workers <= learner.generator_ranks (got {workers} > {ranks})"
                if workers > ranks
                else f"rollout.weight_sync=ipc needs cluster.placement=colocated (got "
                f"{cfg.cluster.placement}): the rollout workers and G's ranks share GPUs"
            )


def lora_problems(cfg: Config, roles: set[str]) -> Iterator[str]:
    """LoRA combinations that cannot run (docs/lora.md)."""
    s, d, lrn = cfg.model.student, cfg.model.discriminator, cfg.learner
    proxy = cfg.algorithm.proxy_kd.proxy
    if proxy is not None and proxy.lora.enabled:
        yield "algorithm.proxy_kd.proxy.lora.rank > 0: the Proxy-KD proxy trains every weight"
    if d.lora.dropout:
        yield (
            f"model.discriminator.lora.dropout={d.lora.dropout}: D's BT step needs dropout 0 "
            "(its no-grad and training passes must give the same scores, docs/algorithms.md §2.8)"
        )
    if not lrn.shared_base:
        return
    why = []
    if not (s.lora.enabled and d.lora.enabled):
        why.append("model.student.lora.rank and model.discriminator.lora.rank > 0 (LoRA on both)")
    if d.path != "student":
        why.append(f"model.discriminator.path=student (got {d.path!r})")
    if d.dtype != s.dtype:
        why.append(f"one compute dtype (model.*.dtype: {s.dtype} vs {d.dtype})")
    if lrn.backend != "fsdp":
        why.append(
            "learner.backend=fsdp (one DeepSpeed engine steps all of its parameters with one "
            "optimizer; G and D need AdamW steps and gradient clipping of their own)"
        )
    if "discriminator" in roles and lrn.generator_ranks != lrn.discriminator_ranks:
        why.append(
            f"learner.generator_ranks == learner.discriminator_ranks (got "
            f"{lrn.generator_ranks} and {lrn.discriminator_ranks}: one group of ranks)"
        )
    if why:
        yield "learner.shared_base=true needs " + "; ".join(why)


def check_context(cfg: Config) -> None:
    """The student's context (``model.student.max_context``, its shipped shape, or its own
    config: a local directory or ``tiny:`` spec) holds prompt + response."""
    spec = cfg.model.student
    shipped = shipped_shape(spec.path)  # a shipped shape: no hub needed
    ctx = spec.max_context or (shipped.max_context if shipped else model_max_context(spec.path))
    need = cfg.data.max_prompt_length + cfg.data.max_response_length
    if ctx is not None and need > ctx:
        raise ConfigError(
            f"invalid config:\n  - data.max_prompt_length + data.max_response_length = "
            f"{cfg.data.max_prompt_length} + {cfg.data.max_response_length} = {need} exceeds the "
            f"context of model.student.path={spec.path!r} ({ctx} tokens)"
        )
