"""The DeepSpeed ZeRO-2/3 :class:`~gad_ray.learner.engine.Engine`.

The model arrives built on the host, rank 0's with the weights, the other ranks' empty on the
meta device (gad_ray/learner/load_once.py). Building it inside ``deepspeed.zero.Init`` fails with
transformers 5.19 (DeepSpeed 0.19.8), and ``deepspeed.initialize`` given an ordinary model moves
the whole of it to the device before partitioning. So :func:`_place` prepares it first: under
ZeRO-3 it partitions module by module (each parameter placed on the device in the compute dtype,
broadcast from rank 0 and cut to this rank's partition by DeepSpeed's ``zero.Init(module=...)``
conversion before the next arrives; the device never holds more than its partitions plus one
module's parameters), under ZeRO-2 it replicates parameter by parameter from rank 0; then
``deepspeed.initialize`` moves, casts and broadcasts nothing more. The module's parameters are
in the compute dtype; ZeRO's fp32 masters are copies of them (exact for weights stored in bf16).
With bf16 compute, gradients are reduced and accumulated in fp32 (``communication_data_type``,
``data_types.grad_accum_dtype``), as FSDP2's ``reduce_dtype`` here. docs/placement.md, "Learner
backends: loading and partitioning", lists the keys set and why. On CPU, DeepSpeed runs with
``DS_ACCELERATOR=cpu`` over the gloo group the worker initialised.

Gradient accumulation is ours: the config sets ``managed_gradient_accumulation: false``, so
``backward`` only accumulates (ZeRO-2/3 reduce-scatter each micro-batch's gradient into the
partitioned gradient buffers, AVERAGED over ranks, hence ``grad_factor = world size``) and
every ``step`` is the accumulation boundary: clip by the global norm, AdamW step, LR step. Losses
are passed with ``scale_wrt_gas=False`` (they already carry the global denominator). The
optimizer is our ``torch.optim.AdamW`` (no DeepSpeedCPUAdam build), wrapped by ZeRO. With bf16
compute DeepSpeed holds the module in bf16 and keeps the fp32 masters in the ZeRO optimizer
(partitioned, checkpointed with it); :meth:`DeepSpeedEngine.named_full_params` reads those.

Frozen models (the GRPO reference): ZeRO-3 partitions them like the trained model (an engine
without optimizer); with ZeRO-2 they are plain replicated modules.

Offloading (:meth:`DeepSpeedEngine.offload`) uses DeepSpeed's ``offload_states`` /
``reload_states`` (0.19.8). ZeRO-2 offloads every state through it: the fp32 masters
(``hp_params``), the bf16/fp32 module parameters (``lp_params``), the gradient partitions
(``lp_grads``) and the optimizer state (``optim_states``, any torch optimizer). ZeRO-3's
``offload_states`` refuses ``hp_params`` and ``optim_states`` unless the optimizer is DeepSpeed's
FusedAdam, so it offloads ``lp_params``, ``lp_grads`` (the gradient partition buffer, kept
between steps) and ``contiguous_grad_buffer`` (the reduce bucket, freed and re-allocated empty), and
this module moves the fp32 master partitions (``fp32_partitioned_groups_flat``) and the AdamW
state itself. ZeRO-3's small persistent parameters (below ``stage3_param_persistence_threshold``)
stay on the device. DeepSpeed refuses to move the states of an engine with ``offload_param``
(``learner.param_offload`` under ZeRO-3 on GPU): the config rejects that combination with
``learner.offload_idle``. Frozen models: ZeRO-2's are plain modules, moved like any module;
ZeRO-3's (an engine without optimizer, which ``offload_states`` does not support) have each
parameter's partition (``ds_tensor``) and data moved here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gad_ray.config.schema import LearnerConfig, OptimConfig
from gad_ray.learner.engine import MASTER_DTYPE, Engine, Selector
from gad_ray.learner.load_once import broadcast_buffers, broadcast_module, place
from gad_ray.learner.offload import CPU, move_data, move_module, move_optimizer_state
from gad_ray.learner.optim import build_optimizer, build_scheduler

CHECKPOINT_TAG = "deepspeed"


def _import_deepspeed(device: torch.device) -> Any:
    """Import deepspeed with the right accelerator and launcher env vars (one device per actor)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    import deepspeed

    return deepspeed


def deepspeed_config(
    lcfg: LearnerConfig,
    ocfg: OptimConfig | None,
    device: torch.device,
    dtype: torch.dtype,
    offload_params: bool | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict of a learner with ``dtype`` compute (``ocfg=None``: a frozen,
    forward-only model)."""
    on_gpu = device.type == "cuda"
    zero: dict[str, Any] = {"stage": lcfg.zero_stage, "overlap_comm": False}
    if offload_params is None:
        offload_params = lcfg.param_offload
    if offload_params and on_gpu and lcfg.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if lcfg.optimizer_offload and on_gpu and ocfg is not None:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ocfg is not None and dtype == torch.bfloat16:
        # bf16 compute: reduce and accumulate gradients in fp32, as FSDP2's reduce_dtype here
        # (DeepSpeed's defaults for both follow the compute dtype)
        config["communication_data_type"] = "fp32"
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if ocfg is not None:  # DeepSpeed clips at 1.0 unless told otherwise; 0 turns it off
        config["gradient_clipping"] = ocfg.grad_clip or 0.0
    return config


def _zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params: list[torch.Tensor], modifier_rank: int | None = None) -> Any:
    import deepspeed  # imported by the engine first, with the accelerator set

    return deepspeed.zero.GatheredParameters(
        params, modifier_rank=modifier_rank, enabled=_zero3(params[0])
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module


def _named_full(
    model: nn.Module, keep: Selector | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full module parameters one at a time (gathered under ZeRO-3), detached copies (those
    ``keep`` picks; default all)."""
    for name, p in _unwrap(model).named_parameters():
        if keep is None or keep(name):
            with _gathered([p]):
                yield name, p.detach().clone()


def _named_masters(engine: Any, keep: Selector | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The optimizer's full fp32 master of each trained parameter, one at a time (collective);
    the module parameter itself where ZeRO keeps no separate master (frozen ones); those
    ``keep`` picks (default all)."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in _unwrap(engine).named_parameters():
        if keep is not None and not keep(name):
            continue
        master = safe_get_full_fp32_param(p) if p.requires_grad else None
        if master is None:
            with _gathered([p]):
                master = p.detach().clone()
        yield name, master.to(MASTER_DTYPE)


class DeepSpeedEngine(Engine):
    """ZeRO-2/3 via ``deepspeed.initialize`` around an unwrapped HF-style model."""

    def __init__(
        self,
        model: nn.Module,
        lcfg: LearnerConfig,
        ocfg: OptimConfig,
        device: torch.device,
        dtype: torch.dtype,
        total_steps: int | None = None,
        saved: Selector | None = None,
    ) -> None:
        deepspeed = _import_deepspeed(device)
        self.device, self.dtype, self.saved = device, dtype, saved
        config = deepspeed_config(lcfg, ocfg, device, dtype)
        model = _place(model, lcfg, config, device, dtype)
        optimizer = build_optimizer(model.parameters(), ocfg)
        scheduler = build_scheduler(optimizer, ocfg, total_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
            dist_init_required=False,
        )
        self.module = self.ds
        if dtype != MASTER_DTYPE:  # D's ScoreHead computes with its fp32 master, not bf16
            from deepspeed.utils import safe_get_full_fp32_param

            for m in _unwrap(self.ds).modules():
                if getattr(m, "keep_fp32", False):
                    m.fp32_master = partial(safe_get_full_fp32_param, m.weight)
        self.grad_factor = float(dist.get_world_size())
        self.zero_stage = lcfg.zero_stage
        self.frozen_on_cpu = (
            lcfg.reference_offload and device.type == "cuda" and self.zero_stage == 3
        )

    # -- offload ---------------------------------------------------------------------------
    def _own_moves(self) -> bool:
        """Whether we move the fp32 masters and Adam state ourselves: ZeRO-3 with them on the
        device (``offload_states`` only moves FusedAdam's; with ``optimizer_offload`` on GPU
        they already live on CPU)."""
        return self.zero_stage == 3 and not self.ds.zero_use_cpu_optimizer()

    def _move_frozen(self, frozen: dict[str, nn.Module], device: torch.device, copy: bool) -> None:
        if self.frozen_on_cpu:  # ZeRO-3 offload_param: the partitions already live on CPU
            return
        for m in frozen.values():
            params = list(_unwrap(m).parameters())
            if params and _zero3(params[0]):
                move_data([p.ds_tensor for p in params], device, copy)
                move_data(params, device, copy)  # gathered (persistent) ones hold full data
            else:
                move_module(m, device, copy)

    def _offload(self, frozen: dict[str, nn.Module], copy: bool) -> None:
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as State

        if self.ds.zero_offload_param() is not None:
            raise RuntimeError(
                "cannot offload a DeepSpeed ZeRO-3 learner with learner.param_offload=true: "
                "DeepSpeed 0.19.8 does not move the states of an engine that offloads its "
                "parameters (they already live on CPU); use learner.backend=fsdp, or drop "
                "learner.offload_idle"
            )
        pin = self.device.type == "cuda" or copy  # DeepSpeed's pinned path copies, also on CPU
        if self.zero_stage == 3:
            include = [State.lp_params, State.lp_grads, State.contiguous_grad_buffer]
            self.ds.offload_states(include=include, pin_memory=pin)
        else:
            self.ds.offload_states(pin_memory=pin)
        if self._own_moves():
            move_data(self.ds.optimizer.fp32_partitioned_groups_flat, CPU, copy)
            move_optimizer_state(self.ds.optimizer.optimizer, CPU, copy)
        self._move_frozen(frozen, CPU, copy)

    def _onload(self, frozen: dict[str, nn.Module], copy: bool) -> None:
        self.ds.reload_states()
        if self._own_moves():
            move_data(self.ds.optimizer.fp32_partitioned_groups_flat, self.device, copy)
            move_optimizer_state(self.ds.optimizer.optimizer, self.device, copy)
        self._move_frozen(frozen, self.device, copy)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.ds.step()  # boundary: finalize grads, clip, AdamW, LR schedule, zero grads
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def named_full_params(
        self, dtype: torch.dtype | None = None, keep: Selector | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, full in _named_masters(self.ds, keep):
            yield name, full if dtype is None else full.to(dtype)

    def _kept_frozen(self) -> Selector:
        """The frozen parameters a checkpoint keeps (a LoRA reference adapter): DeepSpeed's
        own checkpoint then leaves every frozen one out, and they are saved beside it."""
        frozen = {n for n, p in _unwrap(self.ds).named_parameters() if not p.requires_grad}
        return lambda name: name in frozen and self.saved(name)

    def save(self, path: str, frozen: dict[str, nn.Module]) -> None:
        lora = self.saved is not None
        self.ds.save_checkpoint(path, tag=CHECKPOINT_TAG, exclude_frozen_parameters=lora)
        if lora:
            kept = {name: t.cpu() for name, t in _named_full(self.ds, self._kept_frozen())}
            if dist.get_rank() == 0:
                torch.save(kept, os.path.join(path, "frozen_kept.pt"))
        for key, m in frozen.items():
            state = {name: t.cpu() for name, t in _named_full(m)}
            if dist.get_rank() == 0:
                torch.save(state, os.path.join(path, f"frozen_{key}.pt"))
        dist.barrier()

    def load(self, path: str, frozen: dict[str, nn.Module]) -> None:
        if not os.path.isdir(os.path.join(path, CHECKPOINT_TAG)):
            raise FileNotFoundError(
                f"{path!r} is not a DeepSpeed learner checkpoint: "
                f"{os.path.join(path, CHECKPOINT_TAG)!r} is missing"
            )
        lora = self.saved is not None
        load_path, _ = self.ds.load_checkpoint(
            path,
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not lora,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path!r}")
        if lora:
            kept = torch.load(os.path.join(path, "frozen_kept.pt"), weights_only=True)
            _load_full(self.ds, kept, self._kept_frozen())
        for key, m in frozen.items():
            file = os.path.join(path, f"frozen_{key}.pt")
            if not os.path.isfile(file):
                raise FileNotFoundError(f"checkpoint {path!r} lacks the frozen model {file!r}")
            _load_full(m, torch.load(file, weights_only=True))

    def copy_params_to(self, frozen: nn.Module) -> None:
        _load_full(frozen, dict(_named_masters(self.ds)))

    def param_names(self) -> list[str]:
        return [name for name, _ in _unwrap(self.ds).named_parameters()]

    def copy_within(self, pairs: list[tuple[str, str]]) -> None:
        src = dict(pairs)
        state = {src[n]: t for n, t in _named_masters(self.ds, lambda n: n in src)}
        _load_full(self.ds, state, lambda n: n in state)


def _load_full(
    model: nn.Module, state: dict[str, torch.Tensor], keep: Selector | None = None
) -> None:
    """Copy full tensors ``state`` into ``model``'s (possibly ZeRO-3 partitioned) parameters
    (those ``keep`` picks; default all)."""
    with torch.no_grad():
        for name, p in _unwrap(model).named_parameters():
            if keep is not None and not keep(name):
                continue
            if name not in state:
                raise KeyError(f"frozen model parameter {name!r} missing from the saved state")
            with _gathered([p], modifier_rank=0):
                p.data.copy_(state[name].to(p.device, p.dtype))


def build_frozen_deepspeed(
    model: nn.Module, lcfg: LearnerConfig, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """A forward-only copy in ``dtype``: ZeRO-3 partitioned (params offloaded to CPU with
    ``reference_offload`` on GPU) or, under ZeRO-2, a replicated module; rank 0's weights."""
    model.requires_grad_(False)
    if lcfg.zero_stage != 3:
        return broadcast_module(model, device, dtype).eval()
    deepspeed = _import_deepspeed(device)
    config = deepspeed_config(lcfg, None, device, dtype, offload_params=lcfg.reference_offload)
    model = _place(model, lcfg, config, device, dtype)
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()  # DeepSpeedEngine.eval() returns None
    return engine


def _place(
    model: nn.Module,
    lcfg: LearnerConfig,
    config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """``model`` (rank 0's weights on the host, empty on meta elsewhere) ready for
    ``deepspeed.initialize``, its floating point parameters in the compute ``dtype`` (ZeRO keeps
    fp32 masters of the trained ones): ZeRO-3 partitioned, ZeRO-2 replicated on ``device``."""
    if lcfg.zero_stage != 3:
        return broadcast_module(model, device, dtype)
    _partition(model, config, device, dtype)
    broadcast_buffers(model, device)
    return model


def _partition(
    model: nn.Module, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> None:
    """ZeRO-3-partition ``model`` one module's own parameters at a time, before
    ``deepspeed.initialize`` sees it (which would otherwise move the whole model to the device
    first). Each parameter is placed on ``device`` in ``dtype``, then DeepSpeed's
    ``zero.Init(module=...)`` conversion broadcasts it from rank 0, keeps this rank's partition
    (on CPU with ``offload_param``) and frees the full tensor: the device never holds more than
    its partitions plus one module's parameters."""
    import deepspeed  # imported by the caller first, with the accelerator set

    first: nn.Parameter | None = None
    for module in reversed(list(model.modules())):  # a module's children before itself
        own = [p for p in module.parameters(recurse=False) if not _zero3(p)]
        for p in own:
            place(p, device, dtype)
        if not own:
            continue
        if first is None:
            deepspeed.zero.Init(module=module, config_dict_or_path=config)
            first = own[0]
        else:  # the Init's conversion again: same partitioning, same parameter ids
            first.convert_to_zero_parameters(own)
