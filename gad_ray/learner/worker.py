"""The learner actor base class: distributed init, the micro-batch loop, metrics, checkpoints.

A role (generator, discriminator) subclasses :class:`LearnerWorker`, builds its models in
:meth:`setup` and expresses a training step as a per-micro-batch loss function handed to
:meth:`train_step`. Every rank runs the same number of forwards/backwards: an empty
micro-batch (see ``split_for_ranks``) runs a dummy row with zero loss so collectives line up.
Micro-batches are padded or packed (``learner.packing``, :mod:`gad_ray.learner.packing`).

Offloading: :meth:`LearnerWorker.offload` parks the idle learner's state on CPU. Any method that
needs it onloads automatically: training and forward passes leave the learner onloaded (it is
active again), while checkpoint save/load, gathering full parameters, weight sync, export and
the reference reset offload it again afterwards (they onload for the duration, which needs the
learner's accelerator memory for that long).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from gad_ray.config.schema import Config, LoraSpec
from gad_ray.data.batch import TokenBatch
from gad_ray.learner.checkpoint import load_rank_state, save_rank_state
from gad_ray.learner.engine import Engine
from gad_ray.learner.packing import MicroBatch, attn_implementation, micro_batch, use_packing
from gad_ray.memory import memory_stats
from gad_ray.models.adapter_files import check_base_pointer, write_base_pointer

# (global rows of the micro-batch, micro-batch) -> (loss already divided by the global
# denominators, additive metric sums)
LossFn = Callable[[list[int], MicroBatch], tuple[torch.Tensor, dict[str, float]]]


class LearnerWorker:
    """One rank of a learner group; subclasses set ``self.engine`` in :meth:`setup`."""

    engine: Engine

    def __init__(self, cfg: Config, rank: int, world_size: int, role: str, num_threads: int = 1):
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        torch.set_num_threads(num_threads)
        self.cfg, self.rank, self.world_size, self.role = cfg, rank, world_size, role
        self.step = 0
        self.device = torch.device("cpu")
        self.lora_specs: dict[str, LoraSpec] = {}  # LoRA adapters trained here (setup sets them)
        self.packing = False  # whether micro-batches are packed (set after setup)

    # -- distributed set-up --------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port on it (called on rank 0)."""
        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, addr: str, port: int) -> None:
        """Join the process group (NCCL on GPU, gloo on CPU), then build models via setup()."""
        use_gpu = self.cfg.cluster.gpus_per_node > 0
        if use_gpu:
            self.device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES per actor
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if use_gpu else "gloo",
            init_method=f"tcp://{addr}:{port}",
            rank=self.rank,
            world_size=self.world_size,
        )
        torch.manual_seed(self.cfg.seed)
        self.setup()
        engine = getattr(self, "engine", None)  # (a worker without a model packs nothing)
        if engine is not None:
            attn = attn_implementation(engine.module)
            self.packing = use_packing(self.cfg.learner.packing, attn)

    def packs(self) -> bool:
        """Whether this rank packs its micro-batches (:func:`~gad_ray.learner.packing.use_packing`)."""
        return self.packing

    def setup(self) -> None:
        """Build the models and ``self.engine`` (collective)."""
        raise NotImplementedError

    # -- offloading an idle learner -------------------------------------------------------
    def offload(self, copy: bool = False) -> float:
        """Move this rank's trained state and frozen models to CPU (:meth:`Engine.offload`);
        return the seconds taken."""
        start = time.perf_counter()
        self.engine.offload(self.frozen_models(), copy)
        return time.perf_counter() - start

    def onload(self, copy: bool = False) -> float:
        """Bring the state back to the device (:meth:`Engine.onload`); return the seconds."""
        start = time.perf_counter()
        self.engine.onload(self.frozen_models(), copy)
        return time.perf_counter() - start

    def is_offloaded(self) -> bool:
        return self.engine.offloaded

    @contextmanager
    def onloaded(self) -> Iterator[None]:
        """Run the body with the state on the device: an offloaded learner onloads for it and
        offloads again afterwards."""
        was_offloaded = self.engine.offloaded
        self.onload()
        try:
            yield
        finally:
            if was_offloaded:
                self.offload()

    def memory_stats(self, reset: bool = False) -> dict[str, float]:
        """``{"peak_gb", "current_gb"}`` of this rank's device (see
        :func:`gad_ray.memory.memory_stats`); ``reset`` restarts the peak."""
        return memory_stats(self.device, reset)

    # -- micro-batch loops ---------------------------------------------------------------
    def micro_batches(
        self, batch: TokenBatch, plan: list[list[int]]
    ) -> list[tuple[list[int], list[int], MicroBatch]]:
        """(indices, rows, micro-batch on this device, packed or not) per micro-batch of
        ``plan``; an empty one (``indices == []``) gets row 0 as a dummy (``rows == [0]``).
        Every forward and training pass starts here, so an offloaded learner onloads here (and
        stays onloaded)."""
        self.onload()
        out = []
        for idx in plan:
            rows = idx or [0]
            out.append((idx, rows, micro_batch(batch, rows, self.device, self.packing)))
        return out

    @torch.no_grad()
    def forward_plan(
        self, batch: TokenBatch, plan: list[list[int]], fn: Callable[[MicroBatch], torch.Tensor]
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Run ``fn`` on each of this rank's micro-batches; return global indices and CPU rows."""
        indices, rows = [], []
        for idx, _, mb in self.micro_batches(batch, plan):
            out = fn(mb).float().cpu()
            if idx:
                indices += idx
                rows += list(out)
        return indices, rows

    def train_step(
        self, batch: TokenBatch, plan: list[list[int]], loss_fn: LossFn
    ) -> dict[str, float]:
        """One optimizer step over the global batch: grads accumulated over this rank's
        micro-batches, reduced by the engine; metric sums all-reduced over ranks. Gradients are
        freed (``set_to_none``) by the engine's step. ``pad_ratio``: tokens computed (padding
        and dummy micro-batches included) / real tokens, over all ranks' micro-batches."""
        start = time.perf_counter()
        self.engine.module.train()
        sums: dict[str, float] = {}
        computed = real = 0
        for idx, rows, mb in self.micro_batches(batch, plan):
            loss, metrics = loss_fn(rows, mb)
            if not idx:
                loss, metrics = loss * 0.0, {}
            self.engine.backward(loss * self.engine.grad_factor)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            computed += mb.computed_tokens()
            real += mb.num_tokens() if idx else 0
        lr = self.engine.lr()
        grad_norm = self.engine.step()
        self.step += 1
        out = self.all_reduce_sums(sums | {"computed tokens": computed, "real tokens": real})
        computed, real = out.pop("computed tokens"), out.pop("real tokens")
        seconds = time.perf_counter() - start
        out.update(
            grad_norm=grad_norm,
            lr=lr,
            tokens_per_s=batch.num_tokens() / seconds,
            step_s=seconds,
            pad_ratio=computed / max(real, 1),
        )
        return out

    # -- two-pass surrogate steps (see LearnerGroup.surrogate_step) ---------------------------
    def row_values(self, mb: MicroBatch) -> torch.Tensor:
        """Per-row values [b, k] of a surrogate step; column 0 is the differentiable one, the
        rest are constants the host loss also needs (e.g. a reference's)."""
        raise NotImplementedError(f"{type(self).__name__} has no surrogate step")

    def surrogate_values(
        self, batch: TokenBatch, plan: list[list[int]]
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Pass 1: :meth:`row_values` without gradient, per global row."""
        self.engine.module.eval()
        return self.forward_plan(batch, plan, self.row_values)

    def train_surrogate(
        self, batch: TokenBatch, plan: list[list[int]], coef: torch.Tensor
    ) -> dict[str, float]:
        """Pass 2: one optimizer step on ``sum_i coef_i * value_i(theta)``."""

        def loss_fn(rows: list[int], mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
            value = self.row_values(mb)[:, 0]
            return (coef[rows].to(self.device) * value.float()).sum(), {}

        return self.train_step(batch, plan, loss_fn)

    def all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum each metric over ranks (ranks may lack keys, e.g. after only dummy micro-batches)."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, sums)
        keys = sorted({k for d in gathered for k in d})
        return {k: float(sum(d.get(k, 0.0) for d in gathered)) for k in keys}

    def full_params(self) -> dict[str, torch.Tensor]:
        """Every full fp32 master parameter on rank 0 (empty dict elsewhere)."""
        with self.onloaded():
            return self.engine.full_state_dict()

    # -- checkpoints -----------------------------------------------------------------------
    def frozen_models(self) -> dict[str, torch.nn.Module]:
        """Extra untrained models saved with the checkpoint (e.g. the reference policy)."""
        return {}

    def save_checkpoint(self, path: str) -> None:
        """The sharded training state; with LoRA the adapters (and D's head), not the frozen
        base, plus a pointer to the base (``lora_base.json``)."""
        with self.onloaded():
            self.engine.save(path, self.frozen_models())
        if self.lora_specs and self.rank == 0:
            write_base_pointer(path, self.model_path, self.lora_specs)
        save_rank_state(path, self.rank, {"step": self.step})
        dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        if self.lora_specs:
            check_base_pointer(path, self.model_path)
        with self.onloaded():
            self.engine.load(path, self.frozen_models())
        self.step = load_rank_state(path, self.rank)["step"]
