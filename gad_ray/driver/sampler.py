"""The sampler: the one owner of the student's samples (docs/architecture.md#the-sampler).

Each step the driver asks it for the stage's samples (:meth:`Sampler.sample`). It owns
- the seeds: step t's samples are drawn with :meth:`Sampler.seed` (t), whoever draws them and
  whenever (one step ahead, or again after a rollout worker died);
- the weight versions: the updates each learner role has taken, and the version of its policy
  each rollout role serves. A rollout behind its policy gets the policy's weights (vLLM woken
  first when it sleeps) before it samples or serves the eval;
- the one-step-off pipeline (``trainer.pipeline=one_step_off``): when step t takes its samples,
  step t+1's generation starts on the rollout's own thread and runs while the learners train on
  step t. Role calls return futures, so this is the same loop one step ahead (as in slime's
  ``train_async.py``). The samples in flight travel with a checkpoint;
- healing: rollout workers that die are replaced; their share is drawn again, same seeds, once
  the new workers hold the policy's weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
import torch

from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, make_batch
from gad_ray.data.tokenize import TokenizedExample
from gad_ray.driver.roles import Roles
from gad_ray.learner.group import LearnerError
from gad_ray.recipes.stages import Sampling, StepInput
from gad_ray.rollout.group import RolloutWorkersLost
from gad_ray.rollout.types import Sample
from gad_ray.rollout.weight_sync import WeightSyncError

PENDING_FILE = "pending_samples.pt"
# failures a rebuild of the roles can cure: a dead or failed actor, a broken weight sync
RESTARTABLE = (ray.exceptions.RayError, LearnerError, WeightSyncError, RolloutWorkersLost)
T = TypeVar("T")


@dataclass
class Pending:
    """Samples in flight: step ``step``'s, drawn with ``sampling`` by the policy's weights of
    version ``version``; ``future`` gives (samples, the rollout's times)."""

    step: int
    sampling: Sampling
    future: Future
    version: int


class Sampler:
    """Draws each step's samples over ``roles``' rollout groups.

    ``upcoming()``: the next step's prompts (sampled a step early one step off); ``timer(phase,
    role=None)``: the driver's phase timer; ``log_event(name, values)``: an event at the
    current step (e.g. ``rollout_workers_replaced``).
    """

    def __init__(
        self,
        cfg: Config,
        roles: Roles,
        upcoming: Callable[[], list[TokenizedExample]],
        pad_id: int,
        timer: Callable[..., AbstractContextManager],
        log_event: Callable[[str, dict], None],
    ) -> None:
        self.cfg, self.roles, self.upcoming, self.pad_id = cfg, roles, upcoming, pad_id
        self.timer, self.log_event = timer, log_event
        self.one_step_off = cfg.trainer.pipeline == "one_step_off"
        self.versions: dict[str, int] = {}  # updates per learner role; rollout roles: served
        self.pending: Pending | None = None

    def seed(self, step: int) -> int:
        """Step ``step``'s request seed (each sample then has its own: ``sample_seed``)."""
        return self.cfg.seed * 100_003 + step

    def built(self, rollout: str) -> None:
        """A new rollout role holds its policy's initial weights (version 0)."""
        self.versions[rollout] = 0

    def updated(self, learner: str) -> None:
        """``learner`` took an update: the rollout roles serving it are one version behind."""
        self.versions[learner] = self.versions.get(learner, 0) + 1

    def sample(self, s: Sampling, x: StepInput, following: Sampling | None) -> dict[str, float]:
        """Fill ``x`` with step ``x.step``'s samples, generated now (``trainer.pipeline=sync``)
        or during the last step, with the weights of the step before (``one_step_off``). One
        step off, when the next step samples alike (``following == s``), its generation
        starts now and runs while this step trains. Returns the rollout's times (generate,
        sleep) and peak memory."""
        pending = self.pending
        if pending is None or pending.step != x.step:
            pending = self.launch(s, x.examples, x.step)
        self.pending, times = None, {}
        with self.timer("wait_rollout"):
            try:
                samples, times = pending.future.result()
            except RolloutWorkersLost as lost:
                samples = self.regenerate(s, x, lost)
        if self.one_step_off and following == s:  # even past a stop_at: a checkpoint keeps it
            self.pending = self.launch(s, self.upcoming(), x.step + 1)
        x.samples, x.sampling = samples, s.params
        x.staleness = self.versions.get(s.policy, 0) - pending.version
        x.pairs = torch.tensor([smp.prompt_index for smp in samples], dtype=torch.long)
        prompts = [x.examples[smp.prompt_index].prompt_ids for smp in samples]
        x.student = make_batch(prompts, [smp.token_ids for smp in samples], self.pad_id)
        x.rollout_logprobs = sample_logprobs(x.student, samples)
        if x.staleness > 0:  # off-policy: PPO's old log-probs are the sampling policy's
            x.old_logprobs = x.rollout_logprobs
        return times

    def launch(self, s: Sampling, examples: list[TokenizedExample], step: int) -> Pending:
        """Bring the rollout to its policy's current weights, then start drawing step
        ``step``'s samples of ``examples`` on the rollout's own thread."""
        rollout, roles = self.roles[s.rollout], self.roles
        self.sync(s.rollout, s.policy)
        prompts, seed = [e.prompt_ids for e in examples], self.seed(step)
        sleep, log_memory = self.cfg.rollout.sleep_when_idle, self.cfg.trainer.log_memory

        def job() -> tuple[list[Sample], dict[str, float]]:
            """The samples and this rollout's times (generate, sleep) and peak memory."""
            t0 = time.perf_counter()
            out = rollout.generate(prompts, s.params, seed)
            times = {"generate": time.perf_counter() - t0}
            if log_memory:
                peak = rollout.memory_stats(reset=True)["peak_gb"]
                times[f"mem/{s.rollout}/generate_peak_gb"] = peak
            if sleep:
                t0 = time.perf_counter()
                rollout.sleep()
                roles.asleep.add(s.rollout)
                times["sleep"] = time.perf_counter() - t0
            return out, times

        return Pending(step, s, rollout.submit(job), self.versions.get(s.policy, 0))

    def regenerate(self, s: Sampling, x: StepInput, lost: RolloutWorkersLost) -> list[Sample]:
        """The replaced rollout workers get the policy's current weights and draw the lost
        share of ``x``'s samples again (same seeds); the others' samples are kept."""
        self.log_event("rollout_workers_replaced", {"workers": lost.workers})
        self.versions[s.rollout] = -1  # the new workers hold the initial weights
        self.sync(s.rollout, s.policy)
        prompts = [x.examples[i].prompt_ids for i in lost.missing]
        try:
            redo = self.roles[s.rollout].generate(
                prompts, s.params, self.seed(x.step), lost.missing
            )
        except RolloutWorkersLost as again:
            redo = again.samples + self.regenerate(s, x, again)
        return sorted(lost.samples + redo, key=lambda smp: smp.prompt_index)

    def sync(self, rollout_role: str, policy: str) -> None:
        """Push the policy's new weights to the rollout when it is behind; colocated, wake
        vLLM's weights first and its KV cache after. A rollout worker found dead is replaced
        and the push repeated."""
        rollout = self.roles[rollout_role]
        asleep = rollout_role in self.roles.asleep
        if asleep:
            rollout.wake_up(["weights"])
        if self.versions.get(rollout_role, -1) != self.versions.get(policy, 0):
            with self.timer("weight_sync", role=policy):
                try:
                    self.roles[policy].sync_weights(rollout.workers)
                except RESTARTABLE:
                    if not (dead := rollout.replace_dead()):
                        raise
                    self.log_event("rollout_workers_replaced", {"workers": dead})
                    self.roles[policy].sync_weights(rollout.workers)
            self.versions[rollout_role] = self.versions.get(policy, 0)
        if asleep:
            rollout.wake_up(["kv_cache"])
            self.roles.asleep.discard(rollout_role)

    def serve(self, rollout_role: str, policy: str, fn: Callable[[Any], T]) -> T:
        """``fn(rollout)`` (e.g. the eval) once the rollout has finished the samples in flight
        and holds the policy's current weights; workers replaced during it get the weights and
        ``fn`` runs again."""
        if self.pending is not None:
            self.pending.future.result()
        self.sync(rollout_role, policy)
        try:
            return fn(self.roles[rollout_role])
        except RolloutWorkersLost:
            self.versions[rollout_role] = -1
            self.sync(rollout_role, policy)
            return fn(self.roles[rollout_role])

    def save(self, ckpt: Path) -> None:
        """Write the next step's samples, when in flight, into checkpoint ``ckpt``."""
        if self.pending is None:
            return
        samples, times = self.pending.future.result()
        stale = self.versions.get(self.pending.sampling.policy, 0) - self.pending.version
        saved = {"step": self.pending.step, "samples": samples, "times": times, "staleness": stale}
        torch.save(saved, ckpt / PENDING_FILE)

    def restore(self, ckpt: Path, learners: tuple[str, ...], sampling: Sampling | None) -> None:
        """After ``learners`` loaded checkpoint ``ckpt``: they are at version 1, every rollout
        role's weights unknown (pushed before it samples), and the samples the checkpoint
        saved in flight (drawn with ``sampling``) are pending again."""
        self.versions = dict.fromkeys(learners, 1)
        path = ckpt / PENDING_FILE
        if not path.is_file():
            return
        saved = torch.load(path, weights_only=False)
        future: Future = Future()
        future.set_result((saved["samples"], saved["times"]))
        version = self.versions[sampling.policy] - saved["staleness"]
        self.pending = Pending(saved["step"], sampling, future, version)


def sample_logprobs(batch: TokenBatch, samples: list[Sample]) -> torch.Tensor:
    """The sampling policy's log-probs [B, T] of each sample's tokens, aligned with ``batch``
    (row i: prompt, then sample i); 0 off the response."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    for i, s in enumerate(samples):
        p = int(batch.prompt_lens[i])
        out[i, p : p + s.length] = torch.tensor(s.logprobs, dtype=torch.float32)
    return out
