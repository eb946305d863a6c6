"""What the driver builds before the loop: Ray, the role groups, the teacher data, the eval set."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from gad_ray.config.schema import Config
from gad_ray.data.dataset import load_examples
from gad_ray.data.loader import StepLoader
from gad_ray.data.tokenize import TokenizedExample, encode_response, tokenize_examples
from gad_ray.placement import is_rollout, role_size
from gad_ray.rollout.types import SamplingParams
from gad_ray.teacher.fetcher import TeacherError, occurrence_indices


def init_ray(cfg: Config, role_sets: list[tuple[str, ...]]) -> None:
    """Join the configured (or running) Ray cluster, or start a local one sized for the roles
    alive at one time (``role_sets``: one per stage)."""
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": cfg.cluster.log_to_driver}
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, **quiet)
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`
        ray.init(**quiet)
        return
    # Local debug mode: logical CPUs may exceed the cores (the phases of a step run in turn).
    need = max(
        sum(role_size(cfg, r)[0] * cpus_per_actor(cfg, r, role_sets) for r in roles)
        for roles in role_sets
    )
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(need) + 1),
        include_dashboard=False,
        num_gpus=cfg.cluster.gpus_per_node or None,
        **quiet,
    )


def cpus_per_actor(cfg: Config, role: str, role_sets: list[tuple[str, ...]]) -> float:
    """Logical CPUs (= torch threads) an actor of ``role`` asks Ray for. On GPU nodes 1 (or
    ``rollout.cpus_per_worker``). On a CPU-only cluster the roles take turns, so each actor may
    use its share of a node's cores: a rollout worker ``cluster.cpus_per_node`` / workers (a
    vLLM-CPU engine runs as many threads as it gets CPUs), a learner rank the cores / the most
    ranks any learner role of the run has."""
    if is_rollout(role):
        if cfg.rollout.cpus_per_worker is not None:
            return cfg.rollout.cpus_per_worker
        if cfg.cluster.gpus_per_node > 0:
            return 1
        return max(1, cfg.cluster.cpus_per_node // cfg.rollout.num_workers)
    if cfg.cluster.gpus_per_node > 0:
        return 1
    ranks = max(role_size(cfg, r)[0] for rs in role_sets for r in rs if not is_rollout(r))
    return max(1, cfg.cluster.cpus_per_node // ranks)


class TeacherData:
    """Batches of prompts with teacher responses, from the dataset file or live from the API.

    With ``teacher.source=api`` the :class:`~gad_ray.teacher.fetcher.TeacherFetcher` actor is
    asked for the next ``teacher.prefetch_batches`` batches ahead of time, so the loop waits
    only when the API is slower than training; every response is cached on disk as it lands.
    The k-th occurrence of a prompt in the file is its teacher sample k (``meta["teacher_sample"]``,
    set once at load), so each repeat has its own response and every epoch or resume reuses it.
    """

    def __init__(self, cfg: Config, tokenizer: Any, run_dir: Path):
        self.cfg, self.tokenizer = cfg, tokenizer
        live = cfg.teacher.source == "api"
        examples, _ = load_examples(cfg.data, require_response=not live)
        tokenized, self.stats = tokenize_examples(examples, tokenizer, cfg.data)
        if live:
            samples = occurrence_indices(cfg.teacher.api, [e.messages for e in tokenized])
            for ex, k in zip(tokenized, samples, strict=True):
                ex.meta["teacher_sample"] = k
        self.loader = StepLoader(
            tokenized, cfg.data.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle
        )
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.fetcher = None
        self.run_dir = run_dir
        self.on_wait: Callable[[str], None] = lambda text: None  # a progress-bar note
        self.waits = 0  # times a step waited for the teacher API to come back
        # batches read ahead: [data position before it, fetch id, examples, responses in?]
        self.ahead: deque[list] = deque()
        self.next_id = 0

    def start(self) -> None:
        """With ``teacher.source=api``, start the fetcher actor (Ray must be up): a missing key
        or an unreachable endpoint fails here."""
        if self.cfg.teacher.source != "api" or self.fetcher is not None:
            return
        from gad_ray.teacher.fetcher import TeacherFetcher

        cache = Path(self.cfg.teacher.api.cache_path)
        cache = cache if cache.is_absolute() else self.run_dir / cache
        self.fetcher = TeacherFetcher.remote(self.cfg.teacher.api.model_dump(), str(cache))
        ray.get(self.fetcher.start.remote())

    def batch_for_step(self, step: int) -> list[TokenizedExample]:
        """The batch of ``step``: the next one in the data order (already fetched by ``peek``)."""
        self._fill()
        return self._resolve(self.ahead.popleft(), step)

    def peek(self) -> list[TokenizedExample]:
        """The next step's batch, without consuming it (the one-step-off pipeline samples it a
        step early); the data position stays before it."""
        self._fill()
        return self._resolve(self.ahead[0], None)

    def _fill(self) -> None:
        """Read batches ahead: one, plus ``teacher.prefetch_batches`` sent to the fetcher."""
        depth = 1 + (self.cfg.teacher.prefetch_batches if self.fetcher is not None else 0)
        while len(self.ahead) < depth:
            state = self.loader.state_dict()
            batch = self.loader.next_batch()
            if self.fetcher is not None:
                self.fetcher.submit.remote(
                    self.next_id,
                    [e.messages for e in batch],
                    [e.meta["teacher_sample"] for e in batch],
                )
            self.ahead.append([state, self.next_id, batch, self.fetcher is None])
            self.next_id += 1

    def _resolve(self, entry: list, step: int | None) -> list[TokenizedExample]:
        """The entry's examples with their teacher responses (waiting for the fetcher)."""
        _, batch_id, batch, resolved = entry
        if not resolved:
            results = self._answers(ray.get(self.fetcher.get.remote(batch_id)), batch, step)
            entry[2], entry[3] = self._with_responses(batch, results, step), True
        return entry[2]

    def _answers(self, results: list, batch: list[TokenizedExample], step: int | None) -> list:
        """``results`` with every transient failure asked again, with backoff, until the API
        answers: an outage makes training wait (saying so in the progress bar), for the missing
        prompts only, up to ``teacher.api.outage_timeout_s``; then :class:`TeacherError`."""
        api = self.cfg.teacher.api
        deadline = time.monotonic() + api.outage_timeout_s
        delay = api.backoff_base_s
        while missing := [i for i, r in enumerate(results) if r.status != "ok" and not r.permanent]:
            if time.monotonic() + delay > deadline:
                where = f"at step {step}" if step is not None else "for the next step"
                raise TeacherError(
                    f"teacher API unavailable {where} for over teacher.api.outage_timeout_s="
                    f"{api.outage_timeout_s:g} s: {len(missing)} of {len(results)} requests "
                    f"unanswered ({results[missing[0]].error})"
                )
            self.on_wait(
                f"teacher API down: waiting for {len(missing)} responses, retry in {delay:.0f} s"
            )
            self.waits += 1
            time.sleep(delay)
            delay = min(2 * delay, api.backoff_max_s)
            self.fetcher.submit.remote(
                self.next_id,
                [batch[i].messages for i in missing],
                [batch[i].meta["teacher_sample"] for i in missing],
            )
            again = ray.get(self.fetcher.get.remote(self.next_id))
            self.next_id += 1
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        self.on_wait("")
        return results

    def _with_responses(
        self, batch: list[TokenizedExample], results: list, step: int | None
    ) -> list[TokenizedExample]:
        where = f"at step {step}" if step is not None else "for the next step"
        out = []
        for ex, r in zip(batch, results, strict=True):
            if r.status != "ok":  # a permanent refusal: this prompt has no teacher response
                continue
            ids, cut = encode_response(self.tokenizer, r.text, self.cfg.data.max_response_length)
            out.append(
                dataclasses.replace(ex, response=r.text, response_ids=ids, response_truncated=cut)
            )
        if not out:
            raise TeacherError(f"no teacher response for any prompt {where}: {results[0].error}")
        return out

    def state_dict(self) -> dict:
        """The data position of the next batch to train on (prefetched batches not counted)."""
        return self.ahead[0][0] if self.ahead else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ahead.clear()
        self.loader.load_state_dict(state)

    def shutdown(self) -> None:
        if self.fetcher is not None:
            ray.get(self.fetcher.close.remote())
            ray.kill(self.fetcher)
            self.fetcher = None


@dataclasses.dataclass
class EvalSet:
    """Held-out prompts scored by generation with the eval's own ``params`` (greedy), the
    synthetic checker when it applies."""

    examples: list[TokenizedExample]
    tokenizer: Any
    params: SamplingParams

    def evaluate(self, rollout: Any) -> tuple[dict[str, float], list[Any]]:
        """The scores and the generated samples (one per prompt)."""
        from gad_ray.synthetic.tasks import score_responses

        samples = rollout.generate([e.prompt_ids for e in self.examples], self.params, seed=0)
        texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        lengths = [s.length for s in samples]
        out = {"eval_len_mean": sum(lengths) / len(lengths)}
        if all("task" in e.meta for e in self.examples):
            scores = score_responses([e.messages for e in self.examples], texts)
            out["eval_accuracy"] = scores["overall"]["accuracy"]
            for task, s in scores["tasks"].items():
                out[f"eval_accuracy/{task}"] = s["accuracy"]
        return out, samples


def load_eval_set(cfg: Config, tokenizer: Any) -> EvalSet | None:
    if not cfg.data.eval_path:
        return None
    examples, _ = load_examples(cfg.data, path=cfg.data.eval_path, require_response=False)
    tokenized, _ = tokenize_examples(examples, tokenizer, cfg.data)
    return EvalSet(tokenized, tokenizer, SamplingParams.greedy(cfg.data.max_response_length))
