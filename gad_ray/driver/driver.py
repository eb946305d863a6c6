"""The single controller: runs an algorithm's stages (``gad_ray/recipes/``) over role groups.

The driver holds no model. It owns what every algorithm shares: the stage loop, D || G updates,
checkpoints and resume, periodic eval, Ctrl-C, failure messages and per-phase timing; its
:class:`~gad_ray.driver.sampler.Sampler` owns the samples (seeds, weight versions and sync, the
one-step-off pipeline). Each step:

    x = the step's prompts + teacher responses
    if the stage samples:  y_s ~ rollout, holding the policy's new weights   (sampler.sample;
                           one step off: drawn during the last step, the next one's started)
    metrics = stage.step(driver, x)       role calls + pure functions, a few lines per algorithm
"""

from __future__ import annotations

import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from gad_ray import recipes
from gad_ray import run_dir as st
from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, make_batch
from gad_ray.driver.guards import Guards
from gad_ray.driver.metrics import MetricsLogger, plot_metrics
from gad_ray.driver.roles import Roles, preflight
from gad_ray.driver.sampler import RESTARTABLE, Sampler
from gad_ray.driver.samples import eval_samples
from gad_ray.driver.setup import TeacherData, init_ray, load_eval_set
from gad_ray.export.convert import export_dir
from gad_ray.models.loading import load_tokenizer, resolve_model_path
from gad_ray.plan import check_fits
from gad_ray.recipes.stages import Stage, StepInput, prefix
from gad_ray.role_specs import spec
from gad_ray.teacher.fetcher import TeacherError


class TrainingAborted(RuntimeError):
    """The run stopped early (a dead actor, a teacher outage); a resumable checkpoint exists."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); nothing partial is left."""


class Driver:
    """Runs ``cfg.algorithm.name``'s recipe. ``fit()`` runs (or resumes) it to the end."""

    def __init__(self, cfg: Config):
        check_fits(cfg)  # a GPU that would run out of memory stops the run before anything starts
        self.cfg = cfg
        self.run_dir = st.prepare_run_dir(cfg)
        self.student_path = resolve_model_path(cfg.model.student.path)
        self.tokenizer = load_tokenizer(cfg.model.student.tokenizer or self.student_path)
        self.data = TeacherData(cfg, self.tokenizer, self.run_dir)
        self.eval_set = load_eval_set(cfg, self.tokenizer)
        self.recipe = recipe = recipes.build(cfg, self.data.steps_per_epoch, self.run_dir)
        self.role_sets = recipe.role_sets()
        self.stages = [s for s in recipe.stages if s.steps > 0]
        self.starts = [sum(s.steps for s in self.stages[:i]) for i in range(len(self.stages))]
        self.total_steps = sum(s.steps for s in self.stages)
        self.state: dict[str, Any] = {}  # a recipe's own state, saved with each checkpoint
        self.times: dict[str, float] = {}
        self.stop_requested = False
        self.events: list[tuple[str, dict]] = []  # logged when the next run starts
        self.logger: MetricsLogger | None = None
        self.stop_reason: str | None = None  # why stop_requested was set, when not by Ctrl-C
        self.guards = Guards(cfg.trainer.guards)
        self.start_data, self.start_rng = self.data.state_dict(), st.rng_state()
        self.resume_ckpt = self.initial_ckpt = st.find_resume_checkpoint(cfg, self.run_dir)
        self.step = st.read_trainer_state(self.resume_ckpt)["step"] if self.resume_ckpt else 0
        preflight(cfg, self.role_sets)
        init_ray(cfg, self.role_sets)
        st.check_shared_run_dir(self.run_dir)  # several nodes: every one sees the run dir
        try:
            self.data.start()
            self.build_roles()
        except BaseException:
            self.shutdown()
            raise
        self.overlap = cfg.trainer.overlap_d_g
        if self.overlap == "auto":
            self.overlap = self.roles.disjoint("generator", "discriminator")

    # ---------------------------------------------------------------------------------------
    # the stage loop

    def fit(self, stop_at: int | None = None) -> Path:
        """Run (or resume) the stages to the end, or to ``stop_at``; return the run dir.

        Failures heal: a rollout worker that dies is replaced within the step (its share of
        the samples is generated again); any other failure of a role tears every role down and
        restarts them from the last complete checkpoint, up to ``trainer.max_restarts`` times;
        a teacher outage makes the step wait (``teacher.api.outage_timeout_s``). Past those,
        :class:`TrainingAborted` names the cause and the checkpoint to resume from.
        """
        restarts = 0
        with self.stop_on_sigint():
            while True:
                try:
                    return self.run(stop_at)
                except TeacherError as err:
                    raise self.aborted(self.step, err) from err
                except RESTARTABLE as err:
                    if restarts >= self.cfg.trainer.max_restarts or self.stop_requested:
                        raise self.aborted(self.step, err) from err
                    restarts += 1
                    self.restart(err, restarts)
                except RuntimeError as err:
                    raise self.aborted(self.step, err) from err

    def run(self, stop_at: int | None) -> Path:
        """The stage loop, from the resume point (``self.step``)."""
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        step = self.step
        self.resume()
        logger = self.logger = MetricsLogger(
            self.cfg.trainer, self.run_dir, self.total_steps, step, self.cfg.model_dump(mode="json")
        )
        self.data.on_wait = logger.status
        for event, values in self.events:
            logger.log_event(step, event, values)
        self.events = []
        if step == 0:
            self.enter(self.current, logger, step)
        elif step in self.starts and self.current.eval_label:  # dropped with the resumed
            self.log_eval(logger, self.current.eval_label, step)  # steps' records
        while step < end and not self.stop_requested:
            every = self.cfg.trainer.eval_every
            if every and step % every == 0 and step > 0 and step not in self.starts:
                self.log_eval(logger, "periodic", step)
            metrics = self.run_step(self.current, step)
            logger.log(step, metrics)
            self.check_guards(logger, step, metrics)
            step = self.step = step + 1
            boundary = step < self.total_steps and self.stage_at(step) is not self.current
            new_ckpt_roles = boundary and (
                self.stage_at(step).checkpoint != self.current.checkpoint
            )
            if boundary:
                self.switch(self.stage_at(step), logger, step)
            if (
                self.stop_requested
                or step % self.cfg.trainer.save_every == 0
                or new_ckpt_roles
                or step == end < self.total_steps
            ):
                self.save(step)
            export = self.cfg.trainer.export_every  # the student as an HF folder, as final/
            if export and step % export == 0 and self.roles.alive("generator"):
                self.roles["generator"].save_pretrained(str(export_dir(self.run_dir, step)))
        if step < self.total_steps:
            why = self.stop_reason or (
                "Interrupted" if self.stop_requested else f"Stopped at step {step}"
            )
            print(
                f"\n{why}: saved a checkpoint at step {step} of {self.total_steps}; rerun "
                "with trainer.resume=auto to continue."
            )
        else:
            self.log_eval(logger, "final", step)
            self.finish()
        logger.close()
        return self.run_dir

    def restart(self, err: BaseException, n: int) -> None:
        """Tear every role down and build them again at the last complete checkpoint (or the
        start): the steps since are replayed from the saved state and RNG."""
        done = st.complete_checkpoints(self.run_dir)
        ckpt = done[-1] if done else self.initial_ckpt
        if self.logger is not None:
            self.logger.close()
        print(
            f"\n{type(err).__name__}: {err}\nrestart {n} of {self.cfg.trainer.max_restarts}: "
            f"rebuilding every role from {ckpt or 'the start'}"
        )
        self.roles.shutdown()
        self.state, self.resume_ckpt = {}, ckpt
        self.step = st.read_trainer_state(ckpt)["step"] if ckpt is not None else 0
        if ckpt is None:  # from the start: the first batch and the first RNG state
            self.data.load_state_dict(self.start_data)
            st.set_rng_state(self.start_rng)
        self.events.append(("restart", {"restart": n, "error": f"{type(err).__name__}: {err}"}))
        self.build_roles()

    def build_roles(self) -> None:
        """The roles of the stage at ``self.step``, and a sampler over them (no samples in
        flight, no weights pushed yet)."""
        self.roles = Roles(self.cfg, self.student_path, self.recipe.roles, self.role_sets)
        self.sampler = Sampler(
            self.cfg,
            self.roles,
            self.data.peek,
            self.tokenizer.pad_token_id,
            self.timer,
            lambda name, values: self.logger.log_event(self.step, name, values),
        )
        self.current = self.stage_at(self.step)
        self.ensure_roles(self.current)

    def check_guards(self, logger: MetricsLogger, step: int, metrics: dict[str, Any]) -> None:
        """Reward-hacking guards (``trainer.guards``): each new breach is a ``guard`` event in
        metrics.jsonl and a warning above the progress bar; with ``action=stop`` the run saves
        a checkpoint after this step and stops, as after a first Ctrl-C."""
        breaches = self.guards.update(step, metrics)
        for b in breaches:
            logger.warn(step, "guard", b.record(), b.message, tag=b.name)
        if breaches and self.cfg.trainer.guards.action == "stop":
            self.stop_requested = True
            names = ", ".join(b.name for b in breaches)
            self.stop_reason = f"Stopped by guard {names} (trainer.guards.action=stop)"

    def stage_at(self, step: int) -> Stage:
        i = max(i for i, start in enumerate(self.starts) if start <= step) if step else 0
        return self.stages[min(i, len(self.stages) - 1)]

    def enter(self, stage: Stage, logger: MetricsLogger, step: int) -> None:
        """Start ``stage``: its roles, its on-enter hook, its eval event."""
        self.current = stage
        self.ensure_roles(stage)
        if stage.on_enter is not None:
            stage.on_enter(self)
        if stage.eval_label:
            self.log_eval(logger, stage.eval_label, step)

    def switch(self, stage: Stage, logger: MetricsLogger, step: int) -> None:
        if self.current.on_exit is not None:
            self.current.on_exit(self)
        self.enter(stage, logger, step)

    def ensure_roles(self, stage: Stage) -> None:
        """Build the stage's roles (and stop the others); a new rollout role holds its policy's
        initial weights (version 0)."""
        for name in self.roles.ensure(stage.roles):
            if self.roles.is_rollout(name):
                self.sampler.built(name)
            elif self.cfg.learner.offload_idle:
                self.roles[name].offload()  # on GPU only when its phase comes

    def run_step(self, stage: Stage, step: int) -> dict[str, Any]:
        self.times = {}
        t0 = time.perf_counter()
        with self.timer("teacher"):  # > 0 only while the teacher API is slower (or down)
            examples = self.data.batch_for_step(step)
        teacher = self.batch([e.prompt_ids for e in examples], [e.response_ids for e in examples])
        x = StepInput(step, step - self.starts[self.stages.index(stage)], examples, teacher)
        if stage.sampling is not None:  # one step off, the next step's too when it samples alike
            nxt = self.stage_at(step + 1).sampling if step + 1 < self.total_steps else None
            self.times |= self.sampler.sample(stage.sampling, x, nxt)
        metrics = stage.step(self, x)
        elapsed = time.perf_counter() - t0
        metrics |= {k if k.startswith("mem/") else f"time/{k}": v for k, v in self.times.items()}
        metrics |= {"stage": stage.name, "s_per_step": elapsed}
        metrics["epoch"] = step / self.data.steps_per_epoch
        if x.samples is not None:
            metrics["rollout_staleness"] = x.staleness
            if "generate" in self.times:
                tokens = sum(s.length for s in x.samples)
                metrics["gen_tokens_per_s"] = tokens / self.times["generate"]
        return metrics

    # ---------------------------------------------------------------------------------------
    # learner updates

    def update(self, calls: dict[str, Any]) -> dict[str, Any]:
        """Run each learner role's update ``calls[role](group)`` (D || G when
        ``trainer.overlap_d_g``, else in turn); time, prefix and return their metrics and
        count the roles' new versions."""
        if self.overlap and len(calls) > 1:
            futures = {r: self.roles[r].submit(timed, fn, self.roles[r]) for r, fn in calls.items()}
            results = {r: f.result() for r, f in futures.items()}
        else:
            results = {r: timed(fn, self.roles[r]) for r, fn in calls.items()}
        out: dict[str, Any] = {}
        for role, (metrics, seconds) in results.items():
            p = spec(role).metric_prefix  # and the timer phase's
            phase = f"{p}_update"
            self.times[phase] = seconds
            self.sampler.updated(role)
            out |= prefix(p + "_", metrics)
            self.note_memory(role, phase)
            if self.cfg.learner.offload_idle:  # colocated: wait on CPU while other roles run
                self.roles[role].offload()
        return out

    def note_memory(self, role: str, phase: str) -> None:
        """Log ``role``'s peak memory in ``phase`` (since the last note) as
        ``mem/<role>/<phase>_peak_gb``: GPU tensors on GPU, the process RSS on CPU."""
        if self.cfg.trainer.log_memory:
            peak = self.roles[role].memory_stats(reset=True)["peak_gb"]
            self.times[f"mem/{role}/{phase}_peak_gb"] = peak

    # ---------------------------------------------------------------------------------------
    # eval, batches, timers

    def log_eval(self, logger: MetricsLogger, label: str, step: int) -> None:
        """Greedy eval of the student on ``data.eval_path`` (when its rollout role is alive),
        with a few of its samples (``trainer.log_samples``) and D's scores of them."""
        if self.eval_set is None or not self.roles.alive("rollout"):
            return
        scores, samples = self.sampler.serve("rollout", "generator", self.eval_set.evaluate)
        d = self.roles["discriminator"] if self.roles.alive("discriminator") else None
        k = self.cfg.trainer.log_samples
        rows = eval_samples(self.eval_set.examples, samples, self.tokenizer, k, d)
        logger.log_event(step, label, scores, samples=rows)

    def batch(self, prompts: list[list[int]], responses: list[list[int]]) -> TokenBatch:
        """Right-padded prompt + response rows of token ids."""
        return make_batch(prompts, responses, self.tokenizer.pad_token_id)

    @contextmanager
    def timer(self, phase: str, role: str | None = None):
        """Time ``phase`` (``time/<phase>``); with ``role``, also note its peak memory."""
        t0 = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0
        if role is not None:
            self.note_memory(role, phase)

    # ---------------------------------------------------------------------------------------
    # checkpoints, resume, failures

    def save(self, step: int) -> Path:
        """Checkpoint the stage's learner roles, the next step's in-flight samples, the data
        position, RNG and the recipe's state. A write that fails (a full disk) removes the
        partial checkpoint and raises :class:`CheckpointError`; the previous ones stay."""
        ckpt = st.checkpoint_dir(self.run_dir, step)
        try:
            self.write_checkpoint(ckpt, step)
        except Exception as err:  # never leave a partial checkpoint behind
            shutil.rmtree(ckpt, ignore_errors=True)
            died = ray.exceptions.RayActorError
            if isinstance(err, died) or isinstance(err.__cause__, died):
                raise  # a role died while saving: restartable
            raise CheckpointError(f"could not write checkpoint {ckpt}: {err}") from err
        st.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
        return ckpt

    def write_checkpoint(self, ckpt: Path, step: int) -> None:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / st.STATE_FILE).unlink(missing_ok=True)  # incomplete until written again
        for name in self.current.checkpoint:
            self.roles[name].save_checkpoint(str(ckpt / name))
        self.sampler.save(ckpt)  # the next step's samples in flight travel along
        state = {
            "step": step,
            "data": self.data.state_dict(),
            "rng": st.rng_state(),
            "recipe": self.state,
        }
        st.write_trainer_state(ckpt, state)

    def resume(self) -> None:
        """Load the resume checkpoint (if any) into the stage's roles, data position and RNG;
        the next step's in-flight samples, when the pipeline saved them, are restored too."""
        ckpt = self.resume_ckpt
        if ckpt is None:
            return
        state = st.read_trainer_state(ckpt)
        for name in self.current.checkpoint:
            self.roles[name].load_checkpoint(str(ckpt / name))
        self.data.load_state_dict(state["data"])
        st.set_rng_state(state["rng"])
        self.state = state.get("recipe", {})
        self.sampler.restore(ckpt, self.current.checkpoint, self.current.sampling)
        self.resume_ckpt = None
        print(f"Resumed from {ckpt} (step {self.step} of {self.total_steps}).")

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
        self.roles["generator"].save_pretrained(str(final))
        if self.total_steps % self.cfg.trainer.save_every:
            self.save(self.total_steps)
        plot = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plot.png")
        print(
            f"\nrun dir:     {self.run_dir}\ncheckpoints: {self.run_dir / 'checkpoints'}\n"
            f"metrics:     {self.run_dir / 'metrics.jsonl'} (TensorBoard: "
            f"{self.run_dir / 'tensorboard'})\nplot:        {plot}\nstudent:     {final}"
        )

    def shutdown(self) -> None:
        if getattr(self, "roles", None) is not None:
            self.roles.shutdown(strict=False)  # no role is built after: warn, never mask an error
        self.data.shutdown()


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the seconds it took."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def train(cfg: Config) -> Path:
    """``gad-train``: build the roles, run the stages, shut the actors down."""
    driver = Driver(cfg)
    try:
        return driver.fit()
    finally:
        driver.shutdown()
