"""Proxy-KD (docs/algorithms.md §4): a white-box proxy between the black-box teacher and the
student. One pass over the teacher data, cut into consecutive slices by the config fractions:

    proxy_sft     (sft_fraction):   proxy <- SFT(y_t)
    proxy_dpo x k (dpo_fraction):   reference <- proxy (on entering each iteration);
                                    y^ ~ proxy (the driver samples it);
                                    proxy <- DPO(chosen y_t, rejected y^) + SFT(y_t)
    student_kd    (the rest):       the aligned proxy, exported to <run_dir>/proxy and frozen,
                                    gives top-k targets and sample weights w;
                                    G <- CE(y_t) + alpha * w * top-k KL(proxy || G)

A checkpoint holds the role being trained (the proxy, then the student); the proxy is exported
when alignment ends, and the run is checkpointed there, so it resumes anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gad_ray.algorithms import proxy_sample_weights, seq_mean_logp
from gad_ray.config.schema import Config, ConfigError
from gad_ray.recipes.stages import Recipe, Sampling, Stage, StepDriver, StepInput, sample_stats
from gad_ray.rollout.types import SamplingParams


def check(cfg: Config) -> Iterator[str]:
    pk = cfg.algorithm.proxy_kd
    if pk.proxy is None:
        yield "algorithm.proxy_kd.proxy is required when algorithm.name=proxy_kd"
    if pk.sft_fraction + pk.dpo_fraction >= 1:
        yield (
            f"algorithm.proxy_kd.sft_fraction + dpo_fraction = "
            f"{pk.sft_fraction + pk.dpo_fraction} leaves no data for the student"
        )


def slices(cfg: Config, steps_per_epoch: int) -> tuple[int, int, int]:
    """(proxy SFT steps, steps per DPO iteration, student steps) of one epoch."""
    pk, n = cfg.algorithm.proxy_kd, steps_per_epoch
    sft = max(1, round(pk.sft_fraction * n))
    per_iteration = max(1, round(pk.dpo_fraction * n / pk.dpo_iterations))
    student = n - sft - per_iteration * pk.dpo_iterations
    if student < 1:
        raise ConfigError(
            f"Proxy-KD needs more data: {n} steps of data.prompts_per_step="
            f"{cfg.data.prompts_per_step} give {sft} proxy SFT step(s) (sft_fraction="
            f"{pk.sft_fraction}) and {pk.dpo_iterations} x {per_iteration} DPO step(s) "
            f"(dpo_fraction={pk.dpo_fraction}, dpo_iterations={pk.dpo_iterations}), leaving "
            f"{student} for the student; add data or lower the fractions or prompts_per_step"
        )
    return sft, per_iteration, student


def recipe(cfg: Config, steps_per_epoch: int, run_dir: Path) -> Recipe:
    pk = cfg.algorithm.proxy_kd
    sft, per_iteration, student = slices(cfg, steps_per_epoch)
    export = run_dir / "proxy"
    params = SamplingParams(1, pk.dpo_temperature, pk.dpo_top_p, cfg.data.max_response_length)
    sampling = Sampling(params, rollout="proxy_rollout", policy="proxy")
    stages = [Stage("proxy_sft", sft, ("proxy",), ("proxy",), proxy_sft_step)]
    for it in range(1, pk.dpo_iterations + 1):
        stages.append(
            Stage(
                "proxy_dpo",
                per_iteration,
                ("proxy", "proxy_rollout"),
                ("proxy",),
                lambda d, x, it=it: proxy_dpo_step(d, x, it, per_iteration),
                sampling=sampling,
                on_enter=enter_dpo_iteration,
                on_exit=(lambda d: export_proxy(d, export)) if it == pk.dpo_iterations else None,
            )
        )
    student_roles = ("proxy_frozen", "generator") + (("rollout",) if cfg.data.eval_path else ())
    stages.append(
        Stage(
            "student_kd",
            student,
            student_roles,
            ("generator",),
            student_step,
            eval_label="before_distill",
        )
    )
    roles = {
        "proxy": {"with_reference": True, "total_steps": sft + pk.dpo_iterations * per_iteration},
        "proxy_rollout": {},
        "proxy_frozen": {"path": str(export), "with_reference": False},
        "generator": {"with_reference": False, "total_steps": student},
        "rollout": {},
    }
    return Recipe(stages, roles)


def proxy_sft_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    """The proxy imitates the teacher (token-mean NLL of y)."""
    return d.update({"proxy": lambda proxy: proxy.train_sft(x.teacher)})


def enter_dpo_iteration(d: StepDriver) -> None:
    """Reference = the proxy the last iteration (or SFT) left; restart the iteration's mean."""
    d.roles["proxy"].reset_reference()
    d.state["loglik"] = [0.0, 0]


def proxy_dpo_step(
    d: StepDriver, x: StepInput, iteration: int, per_iteration: int
) -> dict[str, Any]:
    """DPO of the proxy: chosen = the teacher's response, rejected = the proxy's own sample."""
    metrics = d.update({"proxy": lambda proxy: proxy.train_dpo(x.teacher, x.student)})
    # the proxy's mean log-likelihood of (unseen) teacher responses, before this update
    loglik = metrics["proxy_chosen_logp"]
    total, count = d.state["loglik"]
    d.state["loglik"] = [total + loglik, count + 1]
    metrics |= {"proxy_teacher_loglik": loglik, "dpo_iteration": iteration}
    if x.index == per_iteration - 1:
        metrics["proxy_iteration_teacher_loglik"] = (total + loglik) / (count + 1)
    return metrics | sample_stats(x.samples, x.teacher)


def export_proxy(d: StepDriver, path: Path) -> None:
    """End of alignment: the proxy the student distils from, in HF format."""
    d.roles["proxy"].save_pretrained(str(path))


def student_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    """CE on y + alpha * w * top-k KL(proxy || student), teacher-forced on y."""
    pk = d.cfg.algorithm.proxy_kd
    with d.timer("proxy_topk"):
        top_logp, top_ids, proxy_logp = d.roles["proxy_frozen"].topk(x.teacher, pk.top_k)
    confidence = seq_mean_logp(proxy_logp, x.teacher.response_mask)  # s
    weights = proxy_sample_weights(confidence, pk.weight_temperature)
    metrics = d.update(
        {
            "generator": lambda gen: gen.train_distill(
                x.teacher, top_logp, top_ids, weights, pk.alpha
            )
        }
    )
    return metrics | weight_stats(weights, confidence)


def weight_stats(weights: torch.Tensor, confidence: torch.Tensor) -> dict[str, float]:
    """The distribution of the sample weights and of the proxy's confidence ``s``."""
    q = torch.quantile(weights.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        "w_mean": weights.mean().item(),
        "w_std": weights.std().item() if weights.numel() > 1 else 0.0,
        "w_min": weights.min().item(),
        "w_max": weights.max().item(),
        "w_p10": q[0].item(),
        "w_p50": q[1].item(),
        "w_p90": q[2].item(),
        "proxy_teacher_loglik": confidence.mean().item(),
    }
