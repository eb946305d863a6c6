"""RolloutGroup: N rollout workers (Ray actors) that the driver sees as one generator."""

import ray

from gad_ray.config.schema import Config
from gad_ray.data.batch import balanced_partition
from gad_ray.futures import AsyncCalls
from gad_ray.models.loading import VLLM_CPU_ENV
from gad_ray.placement import RolePlacement
from gad_ray.rollout.base import backend_class
from gad_ray.rollout.types import Sample, SamplingParams


class RolloutWorkersLost(RuntimeError):
    """Workers died during ``generate``; they were replaced by fresh ones, which hold the
    initial weights. ``samples``: what the other workers generated; ``missing``: the prompt
    indices to generate again once the new workers have the current weights."""

    def __init__(self, workers: list[int], samples: list[Sample], missing: list[int]):
        super().__init__(f"rollout workers {workers} died and were replaced")
        self.workers, self.samples, self.missing = workers, samples, missing


class RolloutGroup(AsyncCalls):
    """Owns ``cfg.rollout.num_workers`` workers of ``cfg.rollout.backend`` (``vllm`` | ``hf``).

    ``generate`` splits a batch across the workers (balanced by prompt length + max_tokens,
    each sample's token count) and returns the samples prompt-major in prompt order.
    ``workers`` are the actor handles for :func:`gad_ray.rollout.weight_sync.send_weights`.
    With ``model.student.lora.rank`` > 0 they load ``model_path`` as the base once and serve
    the adapter versions the generator sends (docs/lora.md).
    """

    def __init__(
        self,
        cfg: Config,
        model_path: str,
        num_cpus_per_worker: float = 1.0,
        placement: RolePlacement | None = None,
    ):
        """``placement`` (from :func:`gad_ray.placement.plan_placement`) pins worker i to its
        GPUs in the shared pool; without it each worker asks Ray for its GPUs directly."""
        rc = cfg.rollout
        on_gpu = cfg.cluster.gpus_per_node > 0
        if placement is None:
            num_gpus = rc.gpus_per_worker or (rc.tensor_parallel_size if on_gpu else 0)
            placement = RolePlacement(num_gpus, num_cpus_per_worker)
        env = {"env_vars": {} if on_gpu else dict(VLLM_CPU_ENV)}
        spec = cfg.model.student
        actor = ray.remote(backend_class(rc.backend))
        self.cfg, self.replaced = cfg, 0

        def spawn(i: int) -> ray.actor.ActorHandle:
            return actor.options(runtime_env=env, **placement.options(i)).remote(
                model_path, rc, spec.dtype, spec.max_context, cfg.seed + i, spec.lora.rank
            )

        self.spawn = spawn
        self.workers = [spawn(i) for i in range(rc.num_workers)]
        self.info = ray.get([w.health.remote() for w in self.workers])  # waits for start-up

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        seed: int | None = None,
        indices: list[int] | None = None,
    ) -> list[Sample]:
        """``params.n`` samples per prompt, prompt-major in prompt order. ``indices``: each
        prompt's index in the step's batch (default its position), which fixes its seeds and
        ``Sample.prompt_index``. A worker that dies is replaced and :class:`RolloutWorkersLost`
        raised after the other workers finish."""
        idx = list(range(len(prompt_ids))) if indices is None else list(indices)
        costs = [len(p) + params.max_tokens for p in prompt_ids]
        parts = balanced_partition(costs, len(self.workers))
        refs = {}
        for k, (w, part) in enumerate(zip(self.workers, parts, strict=True)):
            if part:
                ref = w.generate.remote(
                    [prompt_ids[j] for j in part], params, seed, [idx[j] for j in part]
                )
                refs[ref] = (k, part)
        samples, dead, missing = [], [], []
        for ref, (k, part) in refs.items():
            try:
                samples += ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(k)
                missing += [idx[j] for j in part]
        if dead:
            self.replace(dead)
            raise RolloutWorkersLost(dead, samples, missing)
        return sorted(samples, key=lambda s: s.prompt_index)  # stable: sample order kept

    def replace(self, which: list[int]) -> None:
        """Start fresh workers in place of ``which`` (they load the initial weights)."""
        for k in which:
            ray.kill(self.workers[k], no_restart=True)
            self.workers[k] = self.spawn(k)
        ray.get([self.workers[k].health.remote() for k in which])
        self.replaced += len(which)

    def replace_dead(self, timeout_s: float = 60.0) -> list[int]:
        """Replace the workers that no longer answer; their indices."""
        dead = []
        for k, w in enumerate(self.workers):
            try:
                ray.get(w.health.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(k)
        if dead:
            self.replace(dead)
        return dead

    def sleep(self, level: int = 1) -> list[dict]:
        """Put every worker to sleep; each reply says whether sleep mode is supported."""
        return ray.get([w.sleep.remote(level) for w in self.workers])

    def wake_up(self, tags: list[str] | None = None) -> list[dict]:
        return ray.get([w.wake_up.remote(tags) for w in self.workers])

    def memory_stats(self, reset: bool = False) -> dict[str, float]:
        """``{"peak_gb", "current_gb"}``, each the max over workers (:mod:`gad_ray.memory`)."""
        stats = ray.get([w.memory_stats.remote(reset) for w in self.workers])
        return {k: max(s[k] for s in stats) for k in stats[0]}

    def shutdown(self) -> None:
        self.close_calls()
        for w in self.workers:
            ray.kill(w)
        self.workers = []
