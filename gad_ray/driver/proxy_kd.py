"""Proxy-KD (SPEC §3): a white-box proxy between the black-box teacher and the student.

One pass over the teacher data, cut into consecutive slices by the config fractions:

1. ``proxy_sft``: the proxy imitates the teacher responses (SFT);
2. ``proxy_dpo``: ``dpo_iterations`` rounds of DPO; chosen = the teacher response, rejected =
   the proxy's own sample (sampled online by its rollout workers), reference = the proxy as the
   previous round left it (re-snapshotted at each round's first step);
3. ``student_kd``: the aligned proxy is exported to ``<run_dir>/proxy/`` and frozen; the student
   learns ``CE(y) + alpha * w * top-k KL(proxy || student)`` on the remaining slice, with
   sample weights ``w`` from the proxy's confidence in each teacher response.

Each stage builds only the actors it needs. Checkpoints hold the role being trained (the proxy
in stages 1-2, the student in stage 3) plus the step, data position and RNG, so a run resumes
anywhere, across stage boundaries included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from gad_ray.algorithms import proxy_sample_weights, seq_mean_logp
from gad_ray.config.schema import Config, ConfigError
from gad_ray.data.batch import make_batch
from gad_ray.data.tokenize import TokenizedExample
from gad_ray.driver import state as st
from gad_ray.driver.metrics import MetricsLogger
from gad_ray.driver.setup import TeacherData, init_ray, load_eval_set
from gad_ray.driver.train import Trainer, prefix, sample_stats
from gad_ray.learner.generator import GeneratorGroup
from gad_ray.learner.proxy import ProxyGroup, proxy_view
from gad_ray.models.loading import check_same_tokenizer, load_tokenizer, resolve_model_path
from gad_ray.rollout.group import RolloutGroup


@dataclass(frozen=True)
class Stages:
    """Step counts of the three stages (one step = one batch of ``data.prompts_per_step``)."""

    sft: int
    dpo_iterations: int
    dpo_per_iteration: int
    student: int

    @property
    def proxy(self) -> int:
        """Steps that train the proxy (SFT + DPO); the student stage starts here."""
        return self.sft + self.dpo_iterations * self.dpo_per_iteration

    @property
    def total(self) -> int:
        return self.proxy + self.student

    def stage(self, step: int) -> str:
        if step < self.sft:
            return "proxy_sft"
        return "proxy_dpo" if step < self.proxy else "student_kd"

    def dpo_position(self, step: int) -> tuple[int, int]:
        """(DPO iteration, 1-based, and the step's index within it) of a ``proxy_dpo`` step."""
        it, pos = divmod(step - self.sft, self.dpo_per_iteration)
        return it + 1, pos


def proxy_kd_stages(cfg: Config, steps_per_epoch: int) -> Stages:
    """Slice one epoch of ``steps_per_epoch`` batches by ``algorithm.proxy_kd``'s fractions."""
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
    return Stages(sft, pk.dpo_iterations, per_iteration, student)


def check_tokenizers(cfg: Config) -> Any:
    """The student's tokenizer, after checking that the proxy's is the same one."""
    student, proxy = cfg.model.student, cfg.algorithm.proxy_kd.proxy
    if proxy is None:
        raise ConfigError("algorithm.proxy_kd.proxy is required when algorithm.name=proxy_kd")
    tok = load_tokenizer(student.tokenizer or student.path)
    check_same_tokenizer(
        tok,
        load_tokenizer(proxy.tokenizer or proxy.path),
        f"student (model.student.path={student.path!r})",
        f"proxy (algorithm.proxy_kd.proxy.path={proxy.path!r})",
    )
    return tok


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


class ProxyKDTrainer(Trainer):
    """The Proxy-KD driver; reuses :class:`Trainer`'s helpers (teacher batches, timers, eval,
    weight sync, Ctrl-C, failure reports, the final export) but sets up its own state and
    builds its roles per stage (``Trainer.__init__`` is not called)."""

    def __init__(self, cfg: Config):
        self.cfg, self.alg, self.pk = cfg, cfg.algorithm, cfg.algorithm.proxy_kd
        self.tokenizer = check_tokenizers(cfg)  # before any actor starts
        self.run_dir = st.prepare_run_dir(cfg)
        init_ray(cfg)
        self.student_path = resolve_model_path(cfg.model.student.path)
        self.proxy_path = resolve_model_path(self.pk.proxy.path)
        self.proxy_export = self.run_dir / "proxy"
        self.data = TeacherData(cfg, self.tokenizer, self.run_dir)
        self.eval_set = load_eval_set(cfg, self.tokenizer)
        self.stages = proxy_kd_stages(cfg, self.data.steps_per_epoch)
        self.total_steps = self.stages.total  # a test may lower it to stop early
        self.rollout: RolloutGroup | None = None  # the student's, for eval only
        self.generator: GeneratorGroup | None = None
        self.discriminator = None
        self.proxy: ProxyGroup | None = None
        self.proxy_rollout: RolloutGroup | None = None
        self.proxy_training = False  # self.proxy is the trained learner, not the frozen export
        self.loglik = [0.0, 0]  # this DPO iteration's sum and count of proxy_teacher_loglik
        self.times: dict[str, float] = {}
        self.stop_requested = False
        self.rollout_stale = self.proxy_stale = False
        self.rollout_asleep = False  # the student's rollout serves eval only: never put to sleep

    # ---------------------------------------------------------------------------------------
    # the three stages

    def proxy_sft_step(self, examples: list[TokenizedExample], step: int) -> dict[str, Any]:
        """Stage 1: the proxy imitates the teacher (token-mean NLL of y)."""
        with self.timer("proxy_update"):
            metrics = prefix("proxy_", self.proxy.train_sft(self.teacher_batch(examples)))
        self.proxy_stale = True
        return metrics

    def proxy_dpo_step(self, examples: list[TokenizedExample], step: int) -> dict[str, Any]:
        """Stage 2: DPO of the proxy; chosen = y_teacher, rejected = the proxy's own sample."""
        iteration, pos = self.stages.dpo_position(step)
        if pos == 0:
            self.proxy.reset_reference()  # reference = the proxy the last iteration left
            self.loglik = [0.0, 0]
        teacher = self.teacher_batch(examples)
        self.sync_proxy()
        with self.timer("generate"):
            samples = self.proxy_rollout.generate(
                [e.prompt_ids for e in examples],
                1,
                self.pk.dpo_temperature,
                self.pk.dpo_top_p,
                self.cfg.data.max_response_length,
                seed=self.cfg.seed * 100_003 + step,
            )
        rejected = make_batch(
            [examples[s.prompt_index].prompt_ids for s in samples],
            [s.token_ids for s in samples],
            self.tokenizer.pad_token_id,
        )
        with self.timer("proxy_update"):
            dpo = self.proxy.train_dpo(teacher, rejected)
        self.proxy_stale = True
        # the proxy's mean log-likelihood of (unseen) teacher responses, before this update
        metrics = prefix("proxy_", dpo) | {"proxy_teacher_loglik": dpo["chosen_logp"]}
        self.loglik = [self.loglik[0] + dpo["chosen_logp"], self.loglik[1] + 1]
        if pos == self.stages.dpo_per_iteration - 1:
            metrics["proxy_iteration_teacher_loglik"] = self.loglik[0] / self.loglik[1]
        return metrics | sample_stats(samples, teacher) | {"dpo_iteration": iteration}

    def student_step(self, examples: list[TokenizedExample], step: int) -> dict[str, Any]:
        """Stage 3: CE on y + alpha * w * top-k KL(proxy || student), teacher-forced on y."""
        teacher = self.teacher_batch(examples)
        with self.timer("proxy_topk"):
            top_logp, top_ids, proxy_logp = self.proxy.topk(teacher, self.pk.top_k)
        confidence = seq_mean_logp(proxy_logp, teacher.response_mask)  # s
        weights = proxy_sample_weights(confidence, self.pk.weight_temperature)
        with self.timer("g_update"):
            metrics = self.generator.train_distill(
                teacher, top_logp, top_ids, weights, self.pk.alpha
            )
        self.rollout_stale = True
        return prefix("g_", metrics) | weight_stats(weights, confidence)

    def run_step(self, step: int) -> dict[str, Any]:
        self.times = {}
        t0 = time.perf_counter()
        examples = self.data.batch_for_step(step)
        stage = self.stages.stage(step)
        run = {
            "proxy_sft": self.proxy_sft_step,
            "proxy_dpo": self.proxy_dpo_step,
            "student_kd": self.student_step,
        }[stage]
        metrics = run(examples, step)
        metrics |= {f"time/{k}": v for k, v in self.times.items()}
        return metrics | {"stage": stage, "s_per_step": time.perf_counter() - t0}

    def fit(self) -> Path:
        """Run (or resume) the stages up to ``total_steps``; at the end export the student."""
        step = 0
        try:
            step = self.resume()
            logger = MetricsLogger(
                self.cfg.trainer,
                self.run_dir,
                self.total_steps,
                step,
                self.cfg.model_dump(mode="json"),
            )
            with self.stop_on_sigint():
                while step < self.total_steps and not self.stop_requested:
                    self.build_roles(step)  # e.g. the proxy's rollout workers for DPO
                    if step == self.stages.proxy:
                        self.log_eval(logger, "before_distill", step)
                    logger.log(step, self.run_step(step))
                    step += 1
                    if step == self.stages.proxy:
                        self.finish_proxy()
                    if (
                        self.stop_requested
                        or step % self.cfg.trainer.save_every == 0
                        or step == self.stages.proxy
                    ):
                        self.save(step)
            if step < self.stages.total:
                if not (st.checkpoint_dir(self.run_dir, step) / st.STATE_FILE).is_file():
                    self.save(step)
                print(
                    f"\nStopped at step {step} of {self.stages.total}: saved a checkpoint; "
                    f"rerun with trainer.resume=auto to continue."
                )
            else:
                self.log_eval(logger, "final", step)
                self.finish()
            logger.close()
        except (ray.exceptions.RayError, RuntimeError) as err:
            raise self.aborted(step, err) from err
        return self.run_dir

    # ---------------------------------------------------------------------------------------
    # roles per stage

    def build_roles(self, step: int) -> None:
        """Start the actors the stage of ``step`` needs (idempotent)."""
        if step < self.stages.proxy:
            if self.proxy is None:
                self.proxy = ProxyGroup(self.cfg, self.proxy_path, total_steps=self.stages.proxy)
                self.proxy_training = True
            if self.proxy_rollout is None and step >= self.stages.sft:
                self.proxy_rollout = RolloutGroup(proxy_view(self.cfg), self.proxy_path)
                self.proxy_stale = True
            return
        if self.proxy is None:
            self.proxy = ProxyGroup(self.cfg, str(self.proxy_export), with_reference=False)
        if self.generator is None:
            self.generator = GeneratorGroup(
                self.cfg, self.student_path, total_steps=self.stages.student
            )
        if self.rollout is None and self.eval_set is not None:
            self.rollout = RolloutGroup(self.cfg, self.student_path)

    def finish_proxy(self) -> None:
        """End of alignment: export the proxy, drop its training actors, start the student's."""
        self.proxy.save_pretrained(str(self.proxy_export))
        for group in (self.proxy, self.proxy_rollout):
            if group is not None:
                group.shutdown()
        self.proxy = self.proxy_rollout = None
        self.proxy_training = False
        self.build_roles(self.stages.proxy)

    def sync_proxy(self) -> None:
        if self.proxy_stale:
            with self.timer("weight_sync"):
                self.proxy.sync_weights(self.proxy_rollout.workers)
            self.proxy_stale = False

    def trained_roles(self) -> dict[str, Any]:
        """The trained roles: what a checkpoint holds."""
        if self.proxy_training:
            return {"proxy": self.proxy}
        return {"generator": self.generator} if self.generator is not None else {}

    # ---------------------------------------------------------------------------------------
    # checkpoints

    def save(self, step: int) -> Path:
        ckpt = st.checkpoint_dir(self.run_dir, step)
        ckpt.mkdir(parents=True, exist_ok=True)
        for name, group in self.trained_roles().items():
            group.save_checkpoint(str(ckpt / name))
        state = {
            "step": step,
            "data": self.data.state_dict(),
            "rng": st.rng_state(),
            "proxy_kd": {"loglik": self.loglik},
        }
        st.write_trainer_state(ckpt, state)
        st.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
        return ckpt

    def resume(self) -> int:
        """Build the roles of the checkpoint's stage (of step 0 without one) and load it."""
        ckpt = st.find_resume_checkpoint(self.cfg, self.run_dir)
        state = st.read_trainer_state(ckpt) if ckpt is not None else None
        step = state["step"] if state is not None else 0
        self.build_roles(step)
        if state is None:
            return 0
        for name, group in self.trained_roles().items():
            group.load_checkpoint(str(ckpt / name))
        self.data.load_state_dict(state["data"])
        st.set_rng_state(state["rng"])
        self.loglik = state["proxy_kd"]["loglik"]
        self.rollout_stale = self.proxy_stale = True
        print(
            f"Resumed from {ckpt} (step {step} of {self.stages.total}, {self.stages.stage(step)})."
        )
        return step

    def shutdown(self) -> None:
        for group in (self.proxy, self.proxy_rollout, self.rollout, self.generator, self.data):
            if group is not None:
                group.shutdown()


def train(cfg: Config) -> Path:
    """``gad-train`` with ``algorithm=proxy_kd``: run the stages, shut the actors down."""
    trainer = ProxyKDTrainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()
