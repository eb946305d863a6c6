"""A group of N learner actors forming one ``torch.distributed`` group, driven from the host.

The group places its actors with a Ray placement group (one bundle per rank), lets rank 0
publish a free rendezvous port on its node, and initialises gloo (CPU) or NCCL (GPU) on all
ranks. Methods are fanned out to every rank (collectives need them all) and rank 0's result is
returned; a rank that raises or dies raises :class:`LearnerError` naming the role and rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, split_for_ranks
from gad_ray.futures import AsyncCalls
from gad_ray.placement import RolePlacement


class LearnerError(RuntimeError):
    """A learner rank failed; the message names the role and the rank."""


def _bundles(num_ranks: int, use_gpu: bool, cpus_per_rank: float) -> list[dict[str, float]]:
    if use_gpu:
        return [{"GPU": 1, "CPU": cpus_per_rank} for _ in range(num_ranks)]
    return [{"CPU": cpus_per_rank} for _ in range(num_ranks)]


class LearnerGroup(AsyncCalls):
    """N actors of ``worker_cls`` (a :class:`~gad_ray.learner.worker.LearnerWorker`);
    ``submit`` runs any of its blocking calls asynchronously (:mod:`gad_ray.futures`)."""

    def __init__(
        self,
        worker_cls: type,
        cfg: Config,
        num_ranks: int,
        role: str,
        cpus_per_rank: float = 1,
        ready_timeout_s: float = 600.0,
        placement: RolePlacement | None = None,
        **worker_kwargs: Any,
    ) -> None:
        """``placement`` (from :func:`gad_ray.placement.plan_placement`) puts the ranks in a pool
        shared with other roles; without it the group makes its own placement group."""
        self.cfg, self.role, self.num_ranks = cfg, role, num_ranks
        self.use_gpu = cfg.cluster.gpus_per_node > 0
        self.pg: PlacementGroup | None = None  # owned (and removed) by this group only
        if placement is None or placement.pg is None:
            bundles = _bundles(num_ranks, self.use_gpu, cpus_per_rank)
            self.pg = placement_group(bundles, strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=ready_timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(self.pg)
                raise LearnerError(
                    f"{role} learner: no room for {num_ranks} ranks x {bundles[0]} within "
                    f"{ready_timeout_s:.0f} s (cluster resources: {ray.cluster_resources()})"
                ) from None
            placement = RolePlacement(
                1 if self.use_gpu else 0, cpus_per_rank, self.pg, list(range(num_ranks))
            )
        remote_cls = ray.remote(max_restarts=0)(worker_cls)
        self.workers = [
            remote_cls.options(**placement.options(rank)).remote(
                cfg, rank, num_ranks, role, max(1, int(cpus_per_rank)), **worker_kwargs
            )
            for rank in range(num_ranks)
        ]
        try:
            addr, port = self._get([self.workers[0].rendezvous_address.remote()], ranks=[0])[0]
            self.run("init_distributed", addr, port)
            self.packing: bool = self.run("packs")
        except BaseException:
            self.shutdown()
            raise

    def _get(self, refs: list[ray.ObjectRef], ranks: list[int]) -> list[Any]:
        """Wait for all refs; the first failing rank raises :class:`LearnerError` at once."""
        pending = dict(zip(refs, ranks, strict=True))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rank = pending.pop(done[0])
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                raise LearnerError(f"{self.role} learner rank {rank} died: {e}") from e
            except ray.exceptions.RayTaskError as e:
                raise LearnerError(
                    f"{self.role} learner rank {rank} failed: {e.cause!r}"
                ) from e.as_instanceof_cause()
        return ray.get(refs)

    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every rank with the same arguments; results in rank order."""
        refs = [getattr(w, method).remote(*args, **kwargs) for w in self.workers]
        return self._get(refs, list(range(self.num_ranks)))

    def run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """:meth:`run_all`, returning rank 0's result."""
        return self.run_all(method, *args, **kwargs)[0]

    def plan(self, batch: TokenBatch) -> list[list[list[int]]]:
        """Per rank, its micro-batches of global row indices (same count on every rank), by
        ``learner.max_tokens_per_micro_batch`` tokens computed (packed or padded, as the ranks
        compute them) or ``learner.micro_batch_size`` rows (:func:`split_for_ranks`)."""
        lcfg = self.cfg.learner
        return split_for_ranks(
            batch.seq_lens(),
            self.num_ranks,
            lcfg.micro_batch_size,
            lcfg.max_tokens_per_micro_batch,
            self.packing,
        )

    def run_batch(self, method: str, batch: TokenBatch, *args: Any, **kwargs: Any) -> list[Any]:
        """Put ``batch`` in the object store once; each rank gets it plus its micro-batch plan."""
        ref = ray.put(batch)
        refs = [
            getattr(w, method).remote(ref, plan, *args, **kwargs)
            for w, plan in zip(self.workers, self.plan(batch), strict=True)
        ]
        return self._get(refs, list(range(self.num_ranks)))

    def gather_rows(self, method: str, batch: TokenBatch, *args: Any) -> torch.Tensor:
        """Run a per-row forward ``method`` (returning (global indices, rows)) on every rank and
        stack its rows in batch order: [B, ...]."""
        out: dict[int, torch.Tensor] = {}
        for indices, rows in self.run_batch(method, batch, *args):
            out.update(zip(indices, rows, strict=True))
        return torch.stack([out[i] for i in range(len(batch))])

    def surrogate_step(
        self,
        batch: TokenBatch,
        loss_of_values: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
        values: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One exact optimizer step of a loss that is nonlinear in per-row values (BT over
        score pairs, DPO over log-prob pairs), for any split into ranks and micro-batches:

        1. a no-grad pass gives every row's values ``v`` [B, k] (the worker's ``row_values``;
           dropout is 0, so it equals the training forward);
        2. on the host, autograd of ``loss_of_values(v)`` (the global loss) with respect to
           ``v[:, 0]`` gives ``c_i = dL/dv_i``;
        3. a training pass backpropagates the surrogate ``sum_i c_i * v_i(theta)`` per
           micro-batch, whose gradient is exactly ``dL/dtheta`` by the chain rule.

        Returns the loss's metrics (before the update), ``grad_norm``, ``lr``, ``tokens_per_s``,
        ``step_s`` and ``pad_ratio``. The price is the extra no-grad forward (~1/3 of a
        forward+backward). ``values`` [B, k]: pass 1's result when the caller already has it,
        computed with the current weights (then only pass 2 runs here).
        """
        start = time.perf_counter()
        if values is None:
            values = self.gather_rows("surrogate_values", batch)
        values = values.double()
        v = values[:, 0].clone().requires_grad_(True)
        loss, metrics = loss_of_values(torch.cat([v[:, None], values[:, 1:]], dim=1))
        (coef,) = torch.autograd.grad(loss, v)
        out = self.run_batch("train_surrogate", batch, coef.float())[0]
        seconds = time.perf_counter() - start
        return {
            **metrics,
            "grad_norm": out["grad_norm"],
            "lr": out["lr"],
            "pad_ratio": out["pad_ratio"],
            "tokens_per_s": batch.num_tokens() / seconds,
            "step_s": seconds,
        }

    def save_checkpoint(self, path: str) -> None:
        """Sharded save of the full training state (model, optimizer, schedule, RNG, step)."""
        self.run("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self.run("load_checkpoint", path)

    def full_params(self) -> dict:
        """The full fp32 master parameters (gathered from the shards), for checks and tests."""
        return self.run("full_params")

    def offload(self, copy: bool = False) -> list[float]:
        """Every rank moves its trained state (fp32 master shards, gradients if any, optimizer
        state) and frozen models (the reference) to CPU, freeing accelerator memory while other
        roles run (``learner.offload_idle``; moves nothing on a CPU cluster). Any later method
        that needs the state onloads it first. Per-rank seconds taken. ``copy``: copy even
        what is already on CPU (tests)."""
        return self.run_all("offload", copy)

    def onload(self, copy: bool = False) -> list[float]:
        """Bring every rank's state back to its device; per-rank seconds taken."""
        return self.run_all("onload", copy)

    def is_offloaded(self) -> bool:
        """Whether the ranks' state is on CPU (offloaded and not onloaded since)."""
        return all(self.run_all("is_offloaded"))

    def memory_stats(self, reset: bool = False) -> dict[str, float]:
        """``{"peak_gb", "current_gb"}``, each the max over ranks: the device's tensors on GPU,
        the process RSS on CPU (``gad_ray.memory.memory_stats``); the peak is since the
        last ``reset=True`` call. The driver logs it as ``mem/<role>/<phase>_peak_gb``."""
        stats = self.run_all("memory_stats", reset)
        return {k: max(s[k] for s in stats) for k in stats[0]}

    def save_pretrained(self, path: str) -> None:
        """Hugging Face export (``save_pretrained`` + tokenizer) written by rank 0."""
        self.run("save_pretrained", path)

    def shutdown(self) -> None:
        """Kill the actors (their process group goes with them) and release the placement group.

        No collective teardown: it would hang when a rank has died."""
        self.close_calls()
        workers, self.workers = getattr(self, "workers", []), []
        for w in workers:
            ray.kill(w)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
