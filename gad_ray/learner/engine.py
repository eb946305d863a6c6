"""Training engines: the interface the learner workers use, and its FSDP2 implementation.

An :class:`Engine` owns one trainable model plus its optimizer and LR schedule on one rank of
an initialised ``torch.distributed`` group. Workers only ever call the methods below, so a
backend (FSDP2 here, DeepSpeed in ``deepspeed_engine.py``; ``backends.py`` picks one) is a
drop-in replacement.

Precision: trained weights and optimizer state are fp32 ``MASTER_DTYPE``; the model spec's
``dtype`` is only the COMPUTE dtype (FSDP2 ``MixedPrecisionPolicy(param_dtype=compute,
reduce_dtype=fp32)``, DeepSpeed bf16 with fp32 masters and fp32 gradient reduction). A bf16
master would round away an Adam step at lr 1e-6: the bf16 spacing near a weight of 0.02 is
~1.2e-4.

Loading: a model handed to an engine holds the weights on rank 0 (on the host) and may be empty,
on the meta device, on the other ranks; the engines fill every rank's shards from rank 0's
weights, one tensor at a time (gad_ray/learner/load_once.py; docs/placement.md, "Learner
backends: loading and partitioning"). FSDP2 ``fully_shard``-s each decoder layer, then the root,
and loads rank 0's state dict with ``set_model_state_dict(..., broadcast_from_rank0=True)``.

Gradient convention: backends AVERAGE gradients over ranks, so a worker multiplies each
micro-batch loss by ``engine.grad_factor`` (the world size) to get the gradient of the global
loss, whose micro-batch terms are already divided by the global denominator.

Offloading (colocated roles): :meth:`Engine.offload` moves this rank's trained state and the
frozen models to CPU while other roles use the accelerator, :meth:`Engine.onload` brings them
back; the other methods expect an onloaded engine (the worker onloads on demand).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from gad_ray.config.schema import LearnerConfig, ModelSpec, OptimConfig
from gad_ray.learner.checkpoint import load_sharded, save_sharded
from gad_ray.learner.load_once import load_shards, reads_weights
from gad_ray.learner.offload import CPU, move_module, move_optimizer_state, synchronize
from gad_ray.learner.optim import build_optimizer, build_scheduler, set_base_lr


class Engine(ABC):
    """One trainable model on one rank. All methods are collective unless noted."""

    module: nn.Module  # call it like the unwrapped model (forward is sharding-aware)
    dtype: torch.dtype  # the compute dtype (masters are fp32)
    grad_factor: float  # multiply each micro-batch loss by this before ``backward``
    scheduler: torch.optim.lr_scheduler.LambdaLR  # from :func:`build_scheduler`
    device: torch.device  # the accelerator (or CPU) this rank computes on
    offloaded: bool = False  # set by offload(), cleared by onload()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (one micro-batch)."""

    @abstractmethod
    def step(self) -> float:
        """Clip, optimizer step, LR-schedule step, zero grads; return the pre-clip grad norm."""

    def lr(self) -> float:
        """The learning rate the next ``step`` uses (local, not collective): the optimizer's,
        which :meth:`set_base_lr` changes at once (``get_last_lr`` lags until the next step)."""
        return float(self.scheduler.optimizer.param_groups[0]["lr"])

    def set_base_lr(self, lr: float) -> None:
        """Switch the schedule's base learning rate (a new stage); saved with the checkpoint."""
        set_base_lr(self.scheduler, lr)

    @abstractmethod
    def named_full_params(
        self, dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter (trained ones: the fp32 master), or those whose name ``keep``
        accepts, cast to ``dtype`` if given, gathered to full size one at a time, on every rank
        (same order)."""

    def full_state_dict(
        self, dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None
    ) -> dict[str, torch.Tensor]:
        """The full parameters (cast to ``dtype``) on CPU on rank 0, empty on the other ranks."""
        rank0 = dist.get_rank() == 0
        return {n: t.cpu() for n, t in self.named_full_params(dtype, keep) if rank0}

    @abstractmethod
    def save(self, path: str, frozen: dict[str, nn.Module]) -> None:
        """Sharded save of model, optimizer, schedule and the ``frozen`` extra models to ``path``."""

    @abstractmethod
    def load(self, path: str, frozen: dict[str, nn.Module]) -> None:
        """Inverse of :meth:`save` (same world size not required for FSDP2)."""

    @abstractmethod
    def copy_params_to(self, frozen: nn.Module) -> None:
        """Copy this model's current parameters into a frozen model built by ``build_frozen``."""

    def param_names(self) -> list[str]:
        """The model's parameter names (local, not collective)."""
        return [name for name, _ in self.module.named_parameters()]

    @abstractmethod
    def copy_within(self, pairs: list[tuple[str, str]]) -> None:
        """Copy parameter ``src`` into parameter ``dst`` of this model, for each (src, dst) of
        ``pairs`` (same shapes; e.g. G's LoRA adapter into the frozen reference adapter)."""

    def offload(self, frozen: dict[str, nn.Module], copy: bool = False) -> None:
        """Move this rank's trained state (fp32 master shards, gradients if any, optimizer
        state) and the ``frozen`` models (built by ``build_frozen``) to CPU, then free the
        accelerator's cached memory. Already offloaded: nothing. What the config already keeps
        on CPU (``learner.param_offload`` / ``optimizer_offload`` / ``reference_offload``)
        stays. On a CPU engine the moves are no-ops; ``copy`` makes each a real copy into new
        storage (for tests). Local to this rank (not collective)."""
        if self.offloaded:
            return
        self._offload(frozen, copy)
        self.offloaded = True
        synchronize(self.device, free_cache=True)

    def onload(self, frozen: dict[str, nn.Module], copy: bool = False) -> None:
        """Inverse of :meth:`offload`: everything back on ``self.device``. Not offloaded:
        nothing."""
        if not self.offloaded:
            return
        self._onload(frozen, copy)
        self.offloaded = False
        synchronize(self.device)

    @abstractmethod
    def _offload(self, frozen: dict[str, nn.Module], copy: bool) -> None:
        """The backend's moves of :meth:`offload`."""

    @abstractmethod
    def _onload(self, frozen: dict[str, nn.Module], copy: bool) -> None:
        """The backend's moves of :meth:`onload`."""


MASTER_DTYPE = torch.float32  # of every trained weight and its optimizer state


def to_masters(model: nn.Module) -> nn.Module:
    """Trained parameters (``requires_grad``) to fp32 masters; frozen ones (a LoRA base) keep
    their dtype. A fully trained model is cast whole (buffers too)."""
    params = list(model.parameters())
    if all(p.requires_grad for p in params):
        return model.to(MASTER_DTYPE)
    for p in params:
        if p.requires_grad:
            p.data = p.data.to(MASTER_DTYPE)
    return model


Selector = Callable[[str], bool]  # picks parameters by name
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The spec's compute dtype; ``auto`` is bf16 on GPU and fp32 on CPU."""
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec.dtype]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (classes named in HF's ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot find decoder layers of {type(model).__name__} to shard "
            f"(_no_split_modules={sorted(names)})"
        )
    return layers


def _shard(model: nn.Module, device: torch.device, dtype: torch.dtype, offload: bool) -> nn.Module:
    """``fully_shard`` each decoder layer and the root (a layer at a time on the device), then
    fill the shards from rank 0's weights (the other ranks' ``model`` may be empty, on meta)."""
    full = model.state_dict() if reads_weights() else {}  # rank 0's host copy, until filled
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=policy)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for m in [m for m in model.modules() if getattr(m, "keep_fp32", False)]:  # D's ScoreHead
        fully_shard(m, mesh=mesh, mp_policy=fp32, offload_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)
    load_shards(model, full, device, CPU if offload else device)
    return model


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters; a forward without backward leaves the root's (e.g.
    the embeddings) unsharded, with plain tensors in place of the DTensor shards."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full(p: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(p, DTensor):
        return p.detach()
    if p.device.type != device.type:  # CPU-offloaded shard: gather on the compute device
        local = p.to_local().to(device)
        p = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return p.detach().full_tensor()


class FSDP2Engine(Engine):
    """``fully_shard`` per decoder layer + root, AdamW, LambdaLR, grad-norm clipping.

    ``trained`` picks the parameters this engine's optimizer steps (default: every one that
    requires grad) and ``saved`` those its checkpoints hold (default: all); with ``sharded``
    the model is an FSDP2 module already (another engine's, see :meth:`view`)."""

    def __init__(
        self,
        model: nn.Module,
        lcfg: LearnerConfig,
        ocfg: OptimConfig,
        device: torch.device,
        dtype: torch.dtype,
        total_steps: int | None = None,
        trained: Selector | None = None,
        saved: Selector | None = None,
        sharded: bool = False,
    ) -> None:
        offload = (lcfg.param_offload or lcfg.optimizer_offload) and device.type == "cuda"
        self.lcfg, self.device, self.dtype = lcfg, device, dtype
        self.params_on_cpu = offload  # CPUOffloadPolicy: shards, grads and Adam state live on CPU
        self.frozen_on_cpu = lcfg.reference_offload and device.type == "cuda"
        if not sharded:
            model = _shard(to_masters(model), device, dtype, offload)
        self.module, self.saved = model, saved
        self.params = [
            p
            for n, p in self.module.named_parameters()
            if p.requires_grad and (trained is None or trained(n))
        ]
        self.grad_factor = float(dist.get_world_size())
        self.grad_clip = ocfg.grad_clip
        self.optimizer = build_optimizer(self.params, ocfg)
        self.scheduler = build_scheduler(self.optimizer, ocfg, total_steps)

    def view(
        self,
        ocfg: OptimConfig,
        total_steps: int | None,
        trained: Selector,
        saved: Selector | None = None,
    ) -> FSDP2Engine:
        """A second engine over this engine's module with its own optimizer and schedule for the
        parameters ``trained`` picks (a LoRA adapter of a shared base)."""
        return FSDP2Engine(
            self.module, self.lcfg, ocfg, self.device, self.dtype, total_steps, trained, saved, True
        )

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _move(self, frozen: dict[str, nn.Module], device: torch.device, copy: bool) -> None:
        if not self.params_on_cpu:
            reshard(self.module)
            move_module(self.module, device, copy)
            move_optimizer_state(self.optimizer, device, copy)
        if not self.frozen_on_cpu:
            for m in frozen.values():
                reshard(m)
                move_module(m, device, copy)

    def _offload(self, frozen: dict[str, nn.Module], copy: bool) -> None:
        self._move(frozen, CPU, copy)

    def _onload(self, frozen: dict[str, nn.Module], copy: bool) -> None:
        self._move(frozen, self.device, copy)

    def step(self) -> float:
        params = [p for p in self.params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = float(norm)
        if math.isfinite(norm):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def named_full_params(
        self, dtype: torch.dtype | None = None, keep: Selector | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        reshard(self.module)
        for name, p in self.module.named_parameters():
            if keep is None or keep(name):
                full = _full(p, self.device)
                yield name, full if dtype is None else full.to(dtype)

    def save(self, path: str, frozen: dict[str, nn.Module]) -> None:
        args = (self.module, self.optimizer, self.scheduler, frozen, self.saved)
        save_sharded(path, *args)

    def load(self, path: str, frozen: dict[str, nn.Module]) -> None:
        args = (self.module, self.optimizer, self.scheduler, frozen, self.saved)
        load_sharded(path, *args)

    def copy_params_to(self, frozen: nn.Module) -> None:
        reshard(self.module)
        reshard(frozen)
        src = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, p in frozen.named_parameters():
                local = src[name].to_local() if isinstance(src[name], DTensor) else src[name]
                dst = p.to_local() if isinstance(p, DTensor) else p
                dst.copy_(local)

    def copy_within(self, pairs: list[tuple[str, str]]) -> None:
        reshard(self.module)
        params = dict(self.module.named_parameters())
        local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # noqa: E731
        with torch.no_grad():
            for src, dst in pairs:  # same shapes, so the same shard on this rank
                local(params[dst]).copy_(local(params[src]))


def build_frozen_fsdp(
    model: nn.Module, lcfg: LearnerConfig, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """A forward-only FSDP2 copy in the compute ``dtype`` (``learner.reference_offload`` on GPU
    keeps its shards on CPU); see :func:`gad_ray.learner.backends.build_frozen`."""
    model.requires_grad_(False).to(dtype)
    offload = lcfg.reference_offload and device.type == "cuda"
    return _shard(model, device, dtype, offload).eval()
