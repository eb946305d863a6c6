"""The ``cluster``, ``trainer`` (run dir, checkpoints, guards, wandb) and ``eval`` sections."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gad_ray.config.base import Strict


class ClusterConfig(Strict):
    address: str | None = None  # None: start a local Ray; "auto": join the running cluster
    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_node: int = Field(2, ge=1)
    placement: Literal["colocated", "disaggregated"] = "disaggregated"
    gpu_memory_gib: float = Field(80.0, gt=0)  # memory of one GPU, for the plan (gad_ray/plan/)
    # host memory (RAM) of one node, for the plan's per-node check (gad_ray/plan/host.py)
    host_memory_gib: float = Field(1024.0, gt=0)
    log_to_driver: bool = (
        True  # stream the actors' stdout/stderr (vLLM, transformers) to the driver
    )


class WandbConfig(Strict):
    """W&B logging (needs ``pip install 'gad-ray[wandb]'``); a resumed run continues the same W&B
    run (its id is kept in ``<run_dir>/wandb_run_id``)."""

    project: str | None = None  # W&B logging on when set
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    tags: list[str] = []


class GuardsConfig(Strict):
    """Reward-hacking guards (gad_ray/driver/guards.py): a bound per signal, checked over the
    last ``window`` steps of ``stages``; None turns a bound off. Defaults: gad_ray/conf/config.yaml."""

    enabled: bool = True
    action: Literal["warn", "stop"] = "warn"  # stop: also save a checkpoint and stop the run
    window: int = Field(20, ge=1)
    stages: list[str] = ["gad"]
    len_ratio_max: float | None = Field(1.5, gt=0)
    truncation_rate_max: float | None = Field(0.3, ge=0, le=1)
    d_acc_max: float | None = Field(0.98, gt=0, le=1)
    d_acc_band: float | None = Field(0.05, gt=0, le=0.5)
    d_margin_min: float | None = 0.0
    kl_max: float | None = Field(0.5, gt=0)


class TrainerConfig(Strict):
    # where the run's outputs go, made absolute (against the working directory) at start; on a
    # cluster, storage every node mounts (docs/cluster.md#run-storage)
    run_dir: str = Field("outputs/run", validate_default=True)
    resume: str = "auto"  # auto | never | a checkpoint directory
    save_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    # also write the student as an HF folder (<run_dir>/exports/step_N, as final/) every k steps
    export_every: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)  # also evaluate every k steps (data.eval_path)
    tensorboard: bool = True
    wandb: WandbConfig = WandbConfig()
    # D's and G's updates at the same time (they depend only on the step's samples); auto: on
    # when they have GPUs of their own (disaggregated), off when they share devices
    overlap_d_g: Literal["auto", True, False] = "auto"
    # sync: generate with the latest weights, then train; one_step_off: generate step t+1's
    # samples (with the weights after step t-1) while the learners train on step t
    pipeline: Literal["sync", "one_step_off"] = "sync"
    log_memory: bool = True  # mem/<role>/<phase>_peak_gb every step (GPU tensors, or CPU RSS)
    # a failed role (not a rollout worker: those are replaced in place) restarts every role
    # from the last complete checkpoint, this many times per run before the run stops
    max_restarts: int = Field(3, ge=0)
    guards: GuardsConfig = GuardsConfig()
    # generated samples (prompt, student, teacher, D's scores) logged per eval: metrics.jsonl
    # (an eval_samples event), TensorBoard (text) and W&B (a table); 0: none
    log_samples: int = Field(4, ge=0)

    @field_validator("run_dir")
    @classmethod
    def _absolute(cls, path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))


class EvalSetSpec(Strict):
    """One eval set. ``preset`` (lmsys | dolly | selfinst | vicuna) supplies the keys of its
    public schema; a key set here overrides the preset's. Keys may be dotted paths
    (``instances.0.output``). See :mod:`gad_ray.eval.sets`."""

    path: str
    name: str | None = None  # default: the preset, else the file stem
    preset: Literal["lmsys", "dolly", "selfinst", "vicuna"] | None = None
    format: Literal["auto", "jsonl", "parquet", "hf_disk", "hub"] = "auto"
    split: str = "test"
    prompt_key: str | None = None  # a string or a list of {role, content} messages
    input_key: str | None = None  # extra input appended to the prompt (Dolly context)
    reference_key: str | None = None  # the judge's reference answer
    teacher_key: str | None = None  # the teacher response (n-gram F1 / ROUGE-L, teacher row)
    category_key: str | None = None
    reference: Literal["set", "judge"] | None = None  # default: eval.judge.reference
    limit: int | None = Field(None, gt=0)


class EvalModelSpec(Strict):
    """A model to evaluate: an HF directory, hub name or ``tiny:`` spec, or a training
    checkpoint or run dir (exported first: :mod:`gad_ray.export`)."""

    path: str
    name: str | None = None  # default: the directory name

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class JudgeConfig(Strict):
    """An LLM judge behind an OpenAI-compatible API, MT-Bench single-answer grading."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str | None = "You are a helpful assistant."
    template: str | None = None  # None: gad_ray.eval.judge.DEFAULT_TEMPLATE
    reference: Literal["set", "judge"] = "set"  # judge: the judge answers the question first
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, gt=0)
    concurrency: int = Field(16, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(8, ge=0)
    timeout_s: float = Field(120.0, gt=0)


class EvalConfig(Strict):
    """``gad-eval``: generate with each model on each set, judge, report (docs/algorithms.md §5)."""

    models: list[EvalModelSpec] = []
    sets: list[EvalSetSpec] = []
    teacher: Literal["none", "set", "api"] = "set"  # the teacher row: the set's, or teacher.api
    teacher_name: str = "teacher"
    judge: JudgeConfig = JudgeConfig()
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1536, gt=0)
    ngram: int = Field(1, ge=1)  # n of the n-gram overlap F1
    output_dir: str | None = None  # default: <trainer.run_dir>/eval
    cache_path: str | None = (
        None  # judge + teacher API cache; default: <output_dir>/api_cache.sqlite
    )
