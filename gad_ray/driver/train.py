"""The single controller: SPEC §2's Algorithm 1 (GAD), with SeqKD and the frozen-D ablation.

The driver holds no model. Each step it moves token batches between the role groups (rollout
workers, generator learners, discriminator learners) and calls the pure functions of
:mod:`gad_ray.algorithms`. ``algorithm.name`` picks the stages:

- ``gad``: warmup (D: BT vs G's samples; G: SFT on y_t), then GAD steps;
- ``gad_frozen_d``: the same, but D is not updated in the GAD stage;
- ``seqkd``: the generator's SFT warmup only.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch

from gad_ray.algorithms import bt_loss, grpo_advantages
from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, make_batch
from gad_ray.data.tokenize import TokenizedExample
from gad_ray.driver import state as st
from gad_ray.driver.metrics import MetricsLogger, plot_metrics
from gad_ray.driver.setup import TeacherData, build_roles, init_ray, load_eval_set
from gad_ray.models.loading import load_tokenizer, resolve_model_path
from gad_ray.plan import check_fits
from gad_ray.rollout.types import Sample


class TrainingAborted(RuntimeError):
    """The run stopped early (a dead actor, a teacher outage); a resumable checkpoint exists."""


class Trainer:
    def __init__(self, cfg: Config):
        check_fits(cfg)  # gad_ray.plan: stop before any actor starts if a GPU would run out
        self.cfg, self.alg = cfg, cfg.algorithm
        self.run_dir = st.prepare_run_dir(cfg)
        init_ray(cfg)
        self.student_path = resolve_model_path(cfg.model.student.path)
        self.tokenizer = load_tokenizer(cfg.model.student.tokenizer or self.student_path)
        self.data = TeacherData(cfg, self.tokenizer, self.run_dir)
        self.eval_set = load_eval_set(cfg, self.tokenizer)
        self.warmup_steps, self.total_steps = stage_lengths(cfg, self.data.steps_per_epoch)
        try:
            self.roles = build_roles(cfg, self.student_path, self.total_steps)
        except BaseException:
            self.data.shutdown()  # the fetcher actor, if any
            raise
        self.rollout = self.roles.rollout
        self.generator = self.roles.generator
        self.discriminator = self.roles.discriminator
        self.times: dict[str, float] = {}
        self.stop_requested = False
        self.rollout_stale = False  # G changed since the rollout workers last got its weights
        self.rollout_asleep = False

    # ---------------------------------------------------------------------------------------
    # Algorithm 1

    def warmup_step(self, examples: list[TokenizedExample], step: int) -> dict[str, Any]:
        """Warmup: D learns teacher vs current student; G imitates the teacher (SFT), except in
        the first ``warmup.d_only_steps`` steps."""
        metrics: dict[str, Any] = {}
        teacher = self.teacher_batch(examples)
        if self.alg.warmup.discriminator:
            student, pairs, samples = self.sample(examples, step)  # y_s: D's negatives
            with self.timer("d_update"):
                metrics |= prefix("d_", self.discriminator.train_bt(teacher, student, pairs))
            metrics |= sample_stats(samples, teacher)
        d_only = self.alg.warmup.discriminator and step < self.alg.warmup.d_only_steps
        if self.alg.warmup.generator and not d_only:
            with self.timer("g_update"):
                metrics |= prefix("g_", self.generator.train_sft(teacher))
            self.rollout_stale = True
        return metrics

    def gad_step(self, examples: list[TokenizedExample], step: int) -> dict[str, Any]:
        """GAD: reward = D before its update; GRPO advantages; D's BT update; G's PPO update."""
        teacher = self.teacher_batch(examples)
        student, pairs, samples = self.sample(examples, step)  # n samples per prompt (T=0.8)
        with self.timer("score"):
            rewards = self.discriminator.score(student)  # r = D(x, y_s), before D's update
        advantages = grpo_advantages(rewards, pairs, self.alg.grpo.norm_adv_by_std)
        metrics = sample_stats(samples, teacher) | reward_stats(rewards, advantages)
        if self.alg.freeze_discriminator:  # off-policy ablation: D stays as warmup left it
            with self.timer("score"):
                teacher_scores = self.discriminator.score(teacher)
            metrics |= prefix("d_", bt_loss(teacher_scores[pairs], rewards)[1])
        else:
            for _ in range(self.alg.gad.d_steps_per_g_step):
                with self.timer("d_update"):
                    metrics |= prefix("d_", self.discriminator.train_bt(teacher, student, pairs))
        if step - self.warmup_steps >= self.alg.gad.d_only_steps:
            with self.timer("g_update"):
                metrics |= prefix("g_", self.generator.train_grpo(student, advantages))
            self.rollout_stale = True
        return metrics

    def fit(self) -> Path:
        """Run (or resume) the stages to the end; export the student; return the run dir."""
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
            if step == 0:
                self.log_eval(logger, "before_warmup", step=0)
            self.generator.set_base_lr(self.generator_lr(step))
            with self.stop_on_sigint():
                while step < self.total_steps and not self.stop_requested:
                    every = self.cfg.trainer.eval_every
                    if step == self.warmup_steps and self.warmup_steps > 0:
                        self.log_eval(logger, "after_warmup", step)
                    elif every and step % every == 0 and step > 0:
                        self.log_eval(logger, "periodic", step)
                    if step == self.warmup_steps and self.alg.uses_discriminator:
                        self.generator.reset_reference()  # KL anchor = the warmed-up student
                        self.generator.set_base_lr(self.generator_lr(step))
                    logger.log(step, self.run_step(step))
                    step += 1
                    if self.stop_requested or step % self.cfg.trainer.save_every == 0:
                        self.save(step)
            if self.stop_requested:
                print(
                    f"\nInterrupted: saved a checkpoint at step {step}; rerun with "
                    f"trainer.resume=auto to continue."
                )
            else:
                self.log_eval(logger, "final", step)
                self.finish()
            logger.close()
        except (ray.exceptions.RayError, RuntimeError) as err:
            raise self.aborted(step, err) from err
        return self.run_dir

    def run_step(self, step: int) -> dict[str, Any]:
        self.times = {}
        t0 = time.perf_counter()
        examples = self.data.batch_for_step(step)
        stage = "warmup" if step < self.warmup_steps else "gad"
        if stage == "warmup":
            metrics = self.warmup_step(examples, step)
        else:
            metrics = self.gad_step(examples, step)
        elapsed = time.perf_counter() - t0
        metrics |= {f"time/{k}": v for k, v in self.times.items()}
        metrics |= {
            "stage": stage,
            "s_per_step": elapsed,
            "epoch": step / self.data.steps_per_epoch,
        }
        if "generate" in self.times and "response_len_mean" in metrics:
            generated = metrics["response_len_mean"] * len(examples) * self.alg.grpo.n_samples
            metrics["gen_tokens_per_s"] = generated / self.times["generate"]
        return metrics

    # ---------------------------------------------------------------------------------------
    # helpers

    def generator_lr(self, step: int) -> float:
        """G's base LR at ``step``: ``warmup.generator_lr`` in warmup, else generator_optim.lr."""
        if step < self.warmup_steps and self.alg.warmup.generator_lr is not None:
            return self.alg.warmup.generator_lr
        return self.alg.generator_optim.lr

    def teacher_batch(self, examples: list[TokenizedExample]) -> TokenBatch:
        return make_batch(
            [e.prompt_ids for e in examples],
            [e.response_ids for e in examples],
            self.tokenizer.pad_token_id,
        )

    def sample(
        self, examples: list[TokenizedExample], step: int
    ) -> tuple[TokenBatch, torch.Tensor, list[Sample]]:
        """n samples per prompt from G; returns the student batch and each sample's prompt row."""
        g = self.alg.grpo
        self.wake_rollout()
        with self.timer("generate"):
            samples = self.rollout.generate(
                [e.prompt_ids for e in examples],
                g.n_samples,
                g.temperature,
                g.top_p,
                self.cfg.data.max_response_length,
                seed=self.cfg.seed * 100_003 + step,
            )
        self.sleep_rollout()
        pairs = torch.tensor([s.prompt_index for s in samples], dtype=torch.long)
        student = make_batch(
            [examples[s.prompt_index].prompt_ids for s in samples],
            [s.token_ids for s in samples],
            self.tokenizer.pad_token_id,
        )
        return student, pairs, samples

    def wake_rollout(self) -> None:
        """Colocated placement: wake vLLM's weights, push G's new weights, then its KV cache."""
        if self.rollout_asleep:
            self.rollout.wake_up(["weights"])
        self.sync_weights()
        if self.rollout_asleep:
            self.rollout.wake_up(["kv_cache"])
            self.rollout_asleep = False

    def sleep_rollout(self) -> None:
        """Colocated placement: free vLLM's GPU memory while the learners train."""
        if self.cfg.rollout.sleep_when_idle:
            with self.timer("sleep"):
                self.rollout.sleep()
            self.rollout_asleep = True

    def sync_weights(self) -> None:
        """Push G's weights to the rollout workers if G changed since the last push."""
        if self.rollout_stale:
            with self.timer("weight_sync"):
                self.generator.sync_weights(self.rollout.workers)
            self.rollout_stale = False

    @contextmanager
    def timer(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def log_eval(self, logger: MetricsLogger, label: str, step: int) -> None:
        if self.eval_set is None:
            return
        self.wake_rollout()
        scores = self.eval_set.evaluate(self.rollout, self.cfg.data.max_response_length)
        logger.log_event(step, label, scores)

    # ---------------------------------------------------------------------------------------
    # checkpoints, resume, failures

    def learners(self) -> dict[str, Any]:
        roles = {"generator": self.generator}
        if self.discriminator is not None:
            roles["discriminator"] = self.discriminator
        return roles

    def save(self, step: int) -> Path:
        ckpt = st.checkpoint_dir(self.run_dir, step)
        ckpt.mkdir(parents=True, exist_ok=True)
        for name, group in self.learners().items():
            group.save_checkpoint(str(ckpt / name))
        st.write_trainer_state(
            ckpt, {"step": step, "data": self.data.state_dict(), "rng": st.rng_state()}
        )
        st.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
        return ckpt

    def resume(self) -> int:
        ckpt = st.find_resume_checkpoint(self.cfg, self.run_dir)
        if ckpt is None:
            return 0
        state = st.read_trainer_state(ckpt)
        for name, group in self.learners().items():
            group.load_checkpoint(str(ckpt / name))
        self.data.load_state_dict(state["data"])
        st.set_rng_state(state["rng"])
        self.rollout_stale = True
        print(f"Resumed from {ckpt} (step {state['step']} of {self.total_steps}).")
        return state["step"]

    def aborted(self, step: int, err: BaseException) -> TrainingAborted:
        """A role died or the teacher is unreachable: name it and the checkpoint to resume."""
        done = st.complete_checkpoints(self.run_dir)
        where = f"the last checkpoint is {done[-1]}" if done else "no checkpoint was written yet"
        return TrainingAborted(
            f"training stopped at step {step}: {type(err).__name__}: {err}\n"
            f"{where}; fix the cause and rerun with trainer.resume=auto to continue."
        )

    @contextmanager
    def stop_on_sigint(self):
        """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once."""

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to abort).")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def finish(self) -> None:
        final = self.run_dir / "final"
        self.generator.save_pretrained(str(final))
        if self.total_steps % self.cfg.trainer.save_every:
            self.save(self.total_steps)
        plot = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plot.png")
        print(
            f"\nrun dir:     {self.run_dir}\ncheckpoints: {self.run_dir / 'checkpoints'}\n"
            f"metrics:     {self.run_dir / 'metrics.jsonl'} (TensorBoard: "
            f"{self.run_dir / 'tensorboard'})\nplot:        {plot}\nstudent:     {final}"
        )

    def shutdown(self) -> None:
        self.roles.shutdown()
        self.data.shutdown()


def stage_lengths(cfg: Config, steps_per_epoch: int) -> tuple[int, int]:
    """(warmup steps, total steps) of ``cfg.algorithm``."""
    alg = cfg.algorithm
    warmup = 0
    if alg.warmup.generator or alg.warmup.discriminator:
        warmup = math.ceil(alg.warmup.epochs * steps_per_epoch)
        if alg.warmup.max_steps is not None:
            warmup = min(warmup, alg.warmup.max_steps)
    if not alg.uses_discriminator:
        return warmup, warmup
    return warmup, warmup + alg.gad.steps


def sample_stats(samples: list[Sample], teacher: TokenBatch) -> dict[str, float]:
    lengths = torch.tensor([s.length for s in samples], dtype=torch.float32)
    teacher_len = teacher.response_lens.float().mean().item()
    return {
        "response_len_mean": lengths.mean().item(),
        "response_len_max": lengths.max().item(),
        "teacher_len_mean": teacher_len,
        "len_ratio": lengths.mean().item() / max(teacher_len, 1e-6),
        "truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
    }


def reward_stats(rewards: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "adv_mean": advantages.mean().item(),
        "adv_std": advantages.std().item() if advantages.numel() > 1 else 0.0,
        "adv_max": advantages.max().item(),
        "adv_min": advantages.min().item(),
    }


def prefix(p: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {(k if k.startswith(p) else p + k): v for k, v in metrics.items()}


def train(cfg: Config) -> Path:
    """``gad-train``: build the roles, run the stages, shut the actors down."""
    if cfg.algorithm.name == "proxy_kd":
        from gad_ray.driver.proxy_kd import train as train_proxy_kd

        return train_proxy_kd(cfg)
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()
