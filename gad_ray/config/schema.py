"""The whole gad-ray config as one pydantic schema, validated before any actor starts.

The Hydra tree in ``gad_ray/conf/`` mirrors these classes: every group (``model``, ``algorithm``,
``rollout``, ``learner``, ``teacher``, ``cluster``) fills one field of :class:`Config`.
Unknown keys, wrong types and impossible combinations raise :class:`ConfigError`, whose
message names each offending key and value.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class InputError(Exception):
    """A mistake in what the user gave (config, paths, data, model, key): the CLIs print the
    message alone, without a traceback (``HYDRA_FULL_ERROR=1`` shows it)."""


class ConfigError(InputError, ValueError):
    """A config that cannot run; the message names the key(s) and value(s)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---------------------------------------------------------------------------------------------
# model


class LoraSpec(_Strict):
    """LoRA adapters (``peft``) on the model's linear layers; ``rank: 0`` trains every weight.

    With LoRA the base weights are frozen and held in the compute dtype; only the adapters (and
    D's scalar head) are trained, as fp32 masters with their AdamW state (docs/lora.md)."""

    rank: int = Field(0, ge=0)  # 0: off (full fine-tuning)
    alpha: float = Field(16.0, gt=0)  # the update is (alpha / rank) * B A
    dropout: float = Field(0.0, ge=0, lt=1)
    # peft's target_modules: a list of module names, or "all-linear" (every linear layer of the
    # decoder, not the LM head)
    target_modules: list[str] | str = "all-linear"
    # HF export (final/): "merged" writes a plain HF model (W + (alpha/rank) B A, vLLM loads it),
    # "adapter" writes peft's adapter directory + a pointer to the base
    export: Literal["merged", "adapter"] = "merged"

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class ModelSpec(_Strict):
    """One causal LM: a local directory, a hub name, or ``tiny:<size>[-<arch>]`` (built locally)."""

    path: str
    tokenizer: str | None = None  # defaults to ``path``
    # The COMPUTE dtype (forward/backward, rollout weights, HF export); trained weights and
    # optimizer state are always fp32 masters. auto: bf16 on GPU, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    max_context: int | None = Field(None, gt=0)  # overrides the model's max_position_embeddings
    lora: LoraSpec = LoraSpec()


class DiscriminatorSpec(ModelSpec):
    """The discriminator backbone; ``path: student`` initialises it from the student checkpoint."""

    path: str = "student"


class ModelConfig(_Strict):
    student: ModelSpec
    discriminator: DiscriminatorSpec = DiscriminatorSpec()


# ---------------------------------------------------------------------------------------------
# algorithm


class OptimConfig(_Strict):
    """AdamW with a constant or warmup+cosine schedule."""

    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class GRPOConfig(_Strict):
    """Sampling, advantages and the PPO-clip objective of docs/algorithms.md §2.3-§2.4."""

    n_samples: int = Field(8, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    norm_adv_by_std: bool = True
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(None, gt=1)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    kl_coef: float = Field(0.001, ge=0)
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    entropy_coef: float = 0.0


class WarmupConfig(_Strict):
    """Warmup stage: G does SFT on teacher responses, D does BT against G's samples."""

    generator: bool = True
    discriminator: bool = True
    epochs: float = Field(1.0, ge=0)
    max_steps: int | None = Field(None, ge=0)
    generator_lr: float | None = Field(None, gt=0)  # G's SFT lr in warmup; None: generator_optim.lr
    d_only_steps: int = Field(0, ge=0)  # the first k warmup steps update D only (authors: 10)


class GADStageConfig(_Strict):
    steps: int = Field(1600, ge=0)
    d_only_steps: int = Field(0, ge=0)  # the first k GAD steps update D only
    d_steps_per_g_step: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _deprecated_critic_warmup(cls, raw: Any) -> Any:
        """``critic_warmup`` (GAD has no critic) is the old name of ``d_only_steps``."""
        if not isinstance(raw, dict) or "critic_warmup" not in raw:
            return raw
        raw = dict(raw)
        old = raw.pop("critic_warmup")
        if old is not None:
            warnings.warn(
                f"algorithm.gad.critic_warmup={old} is deprecated (GAD has no critic); "
                "use algorithm.gad.d_only_steps (taken as its value now)",
                FutureWarning,
                stacklevel=2,
            )
            raw["d_only_steps"] = old
        return raw


class ProxyKDConfig(_Strict):
    """Proxy-KD (docs/algorithms.md §4): proxy SFT, iterative DPO, then student distillation."""

    proxy: ModelSpec | None = None
    ranks: int = Field(1, ge=1)  # learner ranks of the proxy (its rollout: rollout.num_workers)
    sft_fraction: float = Field(0.1, gt=0, lt=1)
    dpo_fraction: float = Field(0.2, gt=0, lt=1)
    dpo_iterations: int = Field(2, ge=1)
    dpo_beta: float = Field(0.1, gt=0)
    dpo_sft_weight: float = Field(1.0, ge=0)  # weight of -logp(chosen) in the DPO loss
    dpo_temperature: float = Field(1.0, gt=0)
    dpo_top_p: float = Field(0.8, gt=0, le=1)
    alpha: float = Field(1.0, ge=0)
    top_k: int = Field(10, ge=1)
    weight_temperature: float = Field(0.4, gt=0)
    proxy_optim: OptimConfig = OptimConfig(lr=1e-6)


class OPDConfig(_Strict):
    """On-policy distillation from a white-box teacher (docs/algorithms.md §7)."""

    teacher: ModelSpec | None = None  # frozen, the student's tokenizer (a Proxy-KD export too)
    ranks: int = Field(1, ge=1)  # learner ranks of the frozen teacher
    steps: int = Field(64, ge=0)
    lmbda: float = Field(1.0, ge=0, le=1)  # share of steps on-policy; the rest SFT on y_t


class AlgorithmConfig(_Strict):
    name: str  # a module of gad_ray/recipes/ (gad, seqkd, gad_frozen_d, proxy_kd, ...)
    warmup: WarmupConfig = WarmupConfig()
    gad: GADStageConfig = GADStageConfig()
    grpo: GRPOConfig = GRPOConfig()
    generator_optim: OptimConfig = OptimConfig(lr=1e-6, grad_clip=0.2)
    discriminator_optim: OptimConfig = OptimConfig(lr=1e-6, grad_clip=0.2)
    proxy_kd: ProxyKDConfig = ProxyKDConfig()
    opd: OPDConfig = OPDConfig()


# ---------------------------------------------------------------------------------------------
# data, rollout, learner, teacher, cluster, trainer


class DataConfig(_Strict):
    """Prompt (+ teacher response) datasets and their tokenization."""

    train_path: str
    eval_path: str | None = None
    format: Literal["auto", "jsonl", "parquet", "hf_disk", "hub"] = "auto"
    split: str = "train"
    # None: each row's format is recognised (TRL messages or prompt/completion, the authors'
    # content/teacher_response, prompt/response; docs/config.md "Data formats"); a name set here
    # is the only column read. The prompt: a string or a list of {role, content} messages.
    prompt_key: str | None = None
    response_key: str | None = None
    system_prompt: str | None = None
    # a Jinja chat template used instead of the tokenizer's own: the text, or a file's path
    # (read once here, so the config carries the text to every node and checkpoint)
    chat_template: str | None = None
    max_prompt_length: int = Field(2048, gt=0)
    max_response_length: int = Field(1536, gt=0)
    prompt_truncation: Literal["drop", "left", "right", "error"] = "drop"
    on_bad_row: Literal["error", "skip"] = "error"
    prompts_per_step: int = Field(256, gt=0)
    shuffle: bool = True
    limit: int | None = Field(None, gt=0)

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        """Template text stays; any other value is a file's path, replaced by its text."""
        if value is None or "{{" in value or "{%" in value:
            return value
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise ValueError(
                "neither a Jinja template (no '{{' or '{%') nor the path of an existing file"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "{{" not in text and "{%" not in text:
            raise ValueError(f"the file {value!r} holds no Jinja template")
        return text


class RolloutConfig(_Strict):
    backend: Literal["vllm", "hf"] = "vllm"
    num_workers: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)  # set by the cluster preset; tp size on GPU
    gpu_memory_utilization: float = Field(0.7, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(None, gt=0)  # CPU: bound vLLM's KV cache
    max_num_seqs: int = Field(256, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0)  # None: GPU 1; CPU a share of the cores
    enforce_eager: bool = False
    weight_sync: Literal["auto", "object_store", "ipc", "nccl", "gloo"] = "auto"
    bucket_bytes: int = Field(256 * 2**20, gt=0)
    sleep_when_idle: bool = False  # colocated placement: vLLM sleeps while learners train


class LearnerConfig(_Strict):
    backend: Literal["fsdp", "deepspeed"] = "fsdp"
    zero_stage: Literal[2, 3] = 3
    generator_ranks: int = Field(1, ge=1)
    discriminator_ranks: int = Field(1, ge=1)
    micro_batch_size: int = Field(4, ge=1)  # sequences per micro batch per rank
    # dynamic batching: tokens COMPUTED per micro batch and rank, rows x longest row (padded) or
    # the packed length; rows of neighbouring lengths share a micro batch (docs/placement.md)
    max_tokens_per_micro_batch: int | None = Field(None, gt=0)
    # packed sequences (no padding in the forward): auto packs under flash-attention's varlen
    # kernels only; true also under sdpa/eager (a block-causal mask); false pads
    packing: Literal["auto"] | bool = "auto"
    param_offload: bool = False
    optimizer_offload: bool = False
    reference_offload: bool = False
    # Between its own phases each learner moves its GPU state (fp32 master weights, Adam moments,
    # the generator's frozen reference) to CPU, holding ~0 GPU memory while vLLM or the other
    # learner runs on the same GPUs (colocated placement; ignored on CPU).
    offload_idle: bool = False
    # LoRA on one frozen base: ONE learner group holds the base once, G's adapter, D's adapter and
    # scalar head, and the KL reference (G's adapter as warmup left it); it serves both the
    # generator and the discriminator role (needs LoRA on both, D from the student, FSDP2)
    shared_base: bool = False


class TeacherBudget(_Strict):
    max_requests: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    max_dollars: float | None = Field(None, gt=0)


class HeaderFromEnv(_Strict):
    """A secret HTTP header value, read from the environment variable ``env`` when the fetch
    starts; only the variable's name is in the config."""

    env: str = Field(min_length=1)


# header names that carry credentials: their values must come from the environment
_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret", "password", "cookie", "signature")
# request fields the fetcher sets itself (teacher.api.extra_body cannot hold them)
_MANAGED_FIELDS = {
    "model": "teacher.api.model",
    "messages": "the prompt",
    "temperature": "teacher.api.temperature",
    "top_p": "teacher.api.top_p",
    "max_tokens": "teacher.api.max_tokens",
    "max_completion_tokens": "teacher.api.max_tokens (with max_tokens_param)",
    "n": "one response per request",
    "stream": "non-streaming requests",
}


class TeacherAPIConfig(_Strict):
    """An OpenAI-compatible endpoint. The key is read from the env var named here, never stored.

    ``temperature``, ``top_p`` or ``max_tokens`` set to None are left out of the request (the
    endpoint's default applies). See docs/teacher.md "Teacher requests"."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str | None = None
    temperature: float | None = Field(1.0, ge=0)
    top_p: float | None = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(1536, gt=0)
    # the request field that carries max_tokens (newer OpenAI models take only
    # max_completion_tokens); the cache key is the same under either name
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # more request fields, sent as the OpenAI client's extra_body (part of the cache key)
    extra_body: dict[str, Any] = {}
    # more HTTP headers: a plain string value, or {env: VAR} for a secret (read from the
    # environment, never logged or stored); not part of the cache key
    headers: dict[str, str | HeaderFromEnv] = {}
    concurrency: int = Field(16, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_retries: int = Field(8, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    # training waits this long for an unreachable API (only for the prompts it lacks), then
    # stops with a checkpoint
    outage_timeout_s: float = Field(1800.0, gt=0)
    cache_path: str = "teacher_cache.sqlite"
    # false: the k-th occurrence of a prompt in the data gets its own sample k (the teacher's
    # distribution is kept); true: every occurrence shares one response (one request per prompt)
    dedup: bool = False
    price_per_1k_prompt_tokens: float = Field(0.0, ge=0)
    price_per_1k_completion_tokens: float = Field(0.0, ge=0)
    budget: TeacherBudget = TeacherBudget()

    @field_validator("extra_body", "headers", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value  # YAML null: a dict a CLI override can replace

    @field_validator("extra_body")
    @classmethod
    def _extra_body(cls, body: dict[str, Any]) -> dict[str, Any]:
        for name in body:
            if name in _MANAGED_FIELDS:
                raise ValueError(
                    f"the fetcher sets {name!r} itself ({_MANAGED_FIELDS[name]}); remove "
                    f"teacher.api.extra_body.{name}"
                )
        try:
            json.dumps(body)
        except (TypeError, ValueError) as e:
            raise ValueError(f"not JSON: {e}") from None
        return body

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str | HeaderFromEnv]) -> dict:
        for name, value in headers.items():
            if isinstance(value, str) and any(w in name.lower() for w in _SECRET_HEADER_WORDS):
                raise PydanticCustomError(  # type "secret": the error does not show the value
                    "secret",
                    f"header {name} looks like a credential: its value comes from the environment,"
                    f" not the config: teacher.api.headers.{name}={{env: SOME_VAR}}",
                )
        return headers


class TeacherConfig(_Strict):
    source: Literal["dataset", "api"] = "dataset"
    api: TeacherAPIConfig = TeacherAPIConfig()
    prefetch_batches: int = Field(2, ge=0)


class FetchConfig(_Strict):
    """``gad-fetch``: fill a prompt file with teacher responses."""

    input: str | None = None  # default: data.train_path
    output: str | None = None  # default: <stem>.teacher.jsonl|parquet beside the input
    retry_failed: bool = False  # ask again for prompts that failed permanently before


class ClusterConfig(_Strict):
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


class WandbConfig(_Strict):
    """W&B logging (needs ``pip install 'gad-ray[wandb]'``); a resumed run continues the same W&B
    run (its id is kept in ``<run_dir>/wandb_run_id``)."""

    project: str | None = None  # W&B logging on when set
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    tags: list[str] = []


class GuardsConfig(_Strict):
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


class TrainerConfig(_Strict):
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


class EvalSetSpec(_Strict):
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


class EvalModelSpec(_Strict):
    """A model to evaluate: an HF directory, hub name or ``tiny:`` spec, or a training
    checkpoint or run dir (exported first: :mod:`gad_ray.export`)."""

    path: str
    name: str | None = None  # default: the directory name

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class JudgeConfig(_Strict):
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


class EvalConfig(_Strict):
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


class Config(_Strict):
    """The composed, validated configuration of one run."""

    name: str = "run"
    seed: int = 0
    plan_only: bool = False  # gad-train: print the per-GPU memory plan and exit (gad_ray/plan/)
    model: ModelConfig
    algorithm: AlgorithmConfig
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    teacher: TeacherConfig = TeacherConfig()
    fetch: FetchConfig = FetchConfig()
    cluster: ClusterConfig = ClusterConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        problems = list(_combination_problems(self))
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self


def _combination_problems(cfg: Config):
    from gad_ray import recipes  # the algorithms' own checks and their roles

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
    yield from _lora_problems(cfg, roles)
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


def _lora_problems(cfg: Config, roles: set[str]):
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


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}' (value: {e['input']!r})")
        elif e["type"] == "secret":  # never echo the value
            lines.append(f"config key '{key}': {e['msg']}")
        elif e["type"] == "value_error" and not key:
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else e["msg"])
        else:
            lines.append(f"config key '{key}': {e['msg']} (value: {e['input']!r})")
    return "invalid config:\n  - " + "\n  - ".join(lines)


def validate_config(raw: dict[str, Any], check_model_context: bool = True) -> Config:
    """Validate a composed config (a plain dict); raise :class:`ConfigError` naming keys and values.

    With ``check_model_context`` the student's context length is read from its config
    (a local directory or ``tiny:`` spec) and checked against prompt + response length.
    """
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    if check_model_context:
        _check_context(cfg)
    return cfg


def _check_context(cfg: Config) -> None:
    from gad_ray.models.loading import model_max_context
    from gad_ray.models.shapes import shipped_shape

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
