"""Responses to the eval prompts: a checkpoint through vLLM rollout workers, or the teacher API.

Prompts use each model's own chat template (``data.chat_template`` instead, when set); a prompt
longer than ``data.max_prompt_length`` tokens is left-truncated (the generation prompt survives)
and counted. Generation is greedy unless ``eval.temperature > 0`` (then seeded by ``cfg.seed``).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from gad_ray.config.schema import Config, EvalModelSpec
from gad_ray.data.tokenize import encode_prompt
from gad_ray.eval.sets import EvalItem
from gad_ray.models.loading import load_tokenizer, resolve_model_path
from gad_ray.teacher.cache import ResponseCache
from gad_ray.teacher.fetcher import Fetcher


@dataclass
class Response:
    """One row's answer to one item; ``text`` is None when it has none (a failed API call)."""

    text: str | None
    tokens: int | None = None  # response tokens (model rows)
    finish_reason: str | None = None
    truncated_prompt: bool = False
    error: str | None = None


def model_name(spec: EvalModelSpec) -> str:
    return spec.name or os.path.basename(os.path.normpath(spec.path)) or spec.path


def check_model(spec: EvalModelSpec):
    """Resolve a model spec and load its tokenizer (a clear ModelLoadError before any engine)."""
    return resolve_model_path(spec.path), load_tokenizer(spec.path)


def init_ray(cfg: Config) -> None:
    """Join the configured cluster, or start a small local Ray."""
    import ray

    if ray.is_initialized():
        return
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address)
        return
    ray.init(
        num_cpus=max(4, cfg.rollout.num_workers + 1),
        num_gpus=cfg.cluster.gpus_per_node or None,
        include_dashboard=False,
    )


def prompt_ids(
    cfg: Config, tokenizer, items_per_set: list[list[EvalItem]]
) -> tuple[list[list[int]], list[bool]]:
    """Every item's prompt token ids (left-truncated to ``data.max_prompt_length``) and whether
    it was cut."""
    limit = cfg.data.max_prompt_length
    prompts, cut = [], []
    for items in items_per_set:
        for it in items:
            ids = encode_prompt(tokenizer, it.messages, cfg.data.chat_template)
            cut.append(len(ids) > limit)
            prompts.append(ids[-limit:])
    return prompts, cut


def generate_model(
    cfg: Config, spec: EvalModelSpec, items_per_set: list[list[EvalItem]]
) -> list[list[Response]]:
    """Greedy (or sampled) responses of one model to every item of every set, one engine."""
    from gad_ray.rollout.group import RolloutGroup
    from gad_ray.rollout.types import SamplingParams

    path, tokenizer = check_model(spec)
    prompts, cut = prompt_ids(cfg, tokenizer, items_per_set)
    init_ray(cfg)
    group = RolloutGroup(cfg, path)
    try:
        ev = cfg.eval  # the eval's own sampling: greedy unless eval.temperature > 0
        params = SamplingParams(1, ev.temperature, ev.top_p, ev.max_new_tokens)
        samples = group.generate(prompts, params, seed=cfg.seed)
    finally:
        group.shutdown()
    flat = [
        Response(
            tokenizer.decode(s.token_ids, skip_special_tokens=True).strip(),
            len(s.token_ids),
            s.finish_reason,
            c,
        )
        for s, c in zip(samples, cut, strict=True)
    ]
    out, start = [], 0
    for items in items_per_set:
        out.append(flat[start : start + len(items)])
        start += len(items)
    return out


def generate_api(cfg: Config, items: list[EvalItem], cache: ResponseCache) -> list[Response]:
    """The teacher API's responses (``teacher.api`` at the eval sampling settings), cached. A
    parameter ``teacher.api`` leaves out (null: the endpoint does not take it) stays out."""
    settings = {
        "temperature": cfg.eval.temperature,
        "top_p": cfg.eval.top_p,
        "max_tokens": cfg.eval.max_new_tokens,
    }
    api = cfg.teacher.api
    api = api.model_copy(update={k: v for k, v in settings.items() if getattr(api, k) is not None})

    async def run() -> list:
        async with Fetcher(api, cache) as fetcher:
            return await fetcher.fetch_many([it.messages for it in items])

    results = asyncio.run(run())
    return [
        Response(r.text, finish_reason=r.finish_reason, error=r.error)
        if r.status == "ok"
        else Response(None, error=r.error or "failed")
        for r in results
    ]
