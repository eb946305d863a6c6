"""DeepSpeed ZeRO-3 partitions from the host: no rank ever holds the whole model on its device.

Two spawned ranks (tests/learner/ranks.py) build G's DeepSpeed engine and its frozen reference
from full host models, bf16 compute with gradient checkpointing (the GPU presets' path), and run
a first step (policy forward/backward, reference forward, optimizer step). On CPU the device is
the host, so "on the device" is traced, not read off a tensor's device: :class:`DeviceMeter`
tags every storage the engine and DeepSpeed put on the compute device (a ``Tensor.to`` or a
factory call naming that device, a no-op move of a host tensor included, as it would copy on a
GPU) and everything computed from a tagged tensor; after every torch call it sums the tagged
storages that the models' parameters hold (full data, ZeRO-3 partitions ``ds_tensor``). The
peak must stay within this rank's 1/N share of the parameters (in the compute dtype), plus the
largest layer (a decoder layer, or the embeddings), plus the small parameters that ZeRO-3 keeps
whole by design (below ``stage3_param_persistence_threshold``)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from gad_ray.config.schema import LearnerConfig, OptimConfig
from tests.learner.conftest import make_token_batch
from tests.learner.ranks import run_ranks


class DeviceMeter(TorchFunctionMode):
    """Peak bytes of device-tagged storage held by ``models``' parameters (see the module
    docstring)."""

    def __init__(self, device: torch.device, models: list[nn.Module]) -> None:
        super().__init__()
        self.device, self.models = device, models
        self.tagged: dict[int, StorageWeakRef] = {}
        self.peak = 0

    def _names_device(self, func, args: tuple, kwargs: dict) -> bool:  # noqa: ANN001
        dev = kwargs.get("device")
        if dev is None and func in (torch.Tensor.to, torch.Tensor.cuda):
            dev = next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)
        return dev is not None and torch.device(dev).type == self.device.type

    @staticmethod
    def _key(t: object) -> tuple[int, StorageWeakRef] | None:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return None
        ref = StorageWeakRef(t.untyped_storage())
        return ref.cdata, ref

    def _is_tagged(self, t: torch.Tensor) -> bool:
        key = self._key(t)
        if key is None or key[0] not in self.tagged:
            return False
        if self.tagged[key[0]].expired():  # freed: the address may come back as host memory
            del self.tagged[key[0]]
            return False
        return True

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self._names_device(func, args, kwargs) or any(self._is_tagged(t) for t in inputs):
            for t in tree_leaves(out):
                key = self._key(t)
                if key is not None and t.untyped_storage().nbytes():
                    self.tagged.setdefault(*key)
        self.peak = max(self.peak, self.resident())
        return out

    def resident(self) -> int:
        """Bytes of tagged storage the parameters hold now (each storage once)."""
        seen: dict[int, int] = {}
        for model in self.models:
            for p in model.parameters():
                for t in (p, getattr(p, "ds_tensor", None)):
                    if t is not None and t.numel() and self._is_tagged(t):
                        s = t.untyped_storage()
                        seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


def _bound(models: list[nn.Module], layers: list[nn.Module], world: int) -> dict[str, int]:
    """This rank's 1/N share of the parameters, the largest layer, the persistent extra; bytes
    in the parameters' (compute) dtype."""
    params = {id(p): p for m in models for p in m.parameters()}.values()
    size = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # noqa: E731
    share = sum(math.ceil(size(p) / world) * p.element_size() for p in params)
    persistent = sum(
        (size(p) - math.ceil(size(p) / world)) * p.element_size()
        for p in params
        if getattr(p, "ds_persist", False)
    )
    largest = max(sum(size(p) * p.element_size() for p in m.parameters()) for m in layers)
    return {"share": share, "largest_layer": largest, "persistent": persistent}


def construct_and_step(rank: int, world: int, port: int, model_dir: str) -> dict[str, int]:
    import torch.distributed as dist

    from gad_ray.algorithms import aggregate_loss, sft_loss_mat
    from gad_ray.learner.deepspeed_engine import DeepSpeedEngine, build_frozen_deepspeed
    from gad_ray.learner.engine import decoder_layers
    from gad_ray.learner.generator import policy_logprobs
    from gad_ray.models.loading import load_causal_lm

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    device, dtype = torch.device("cpu"), torch.bfloat16
    lcfg = LearnerConfig(backend="deepspeed", zero_stage=3)
    model = load_causal_lm(model_dir, dtype=torch.float32)  # every rank: a full host copy
    model.gradient_checkpointing_enable({"use_reentrant": False})
    ref = load_causal_lm(model_dir, dtype=dtype)
    full_fp32 = sum(p.numel() * 4 for p in model.parameters())
    layers = decoder_layers(model) + [m for m in model.modules() if isinstance(m, nn.Embedding)]
    batch = make_token_batch(seed=rank, n=2)
    with DeviceMeter(device, [model, ref]) as meter:
        engine = DeepSpeedEngine(model, lcfg, OptimConfig(lr=1e-5), device, dtype)
        reference = build_frozen_deepspeed(ref, lcfg, device, dtype)
        built = meter.peak
        engine.module.train()
        logp, _ = policy_logprobs(engine.module, batch)
        loss = aggregate_loss(sft_loss_mat(logp), batch.response_mask, "token-mean")
        engine.backward(loss * engine.grad_factor)
        with torch.no_grad():
            policy_logprobs(reference, batch)
        engine.step()
    bound = _bound([model, ref], layers, world)
    dist.destroy_process_group()
    return {"built": built, "peak": meter.peak, "full_fp32": full_fp32, **bound}


def test_zero3_never_holds_the_whole_model_on_a_device(small_model_dir):
    for rank, got in enumerate(
        run_ranks(f"{__name__}:construct_and_step", model_dir=str(small_model_dir))
    ):
        limit = got["share"] + got["largest_layer"] + got["persistent"]
        print(
            f"rank {rank}: peak {got['peak']} B (after construction {got['built']} B), "
            f"limit {limit} B = share {got['share']} + largest layer {got['largest_layer']} "
            f"+ persistent {got['persistent']}; whole model in fp32 {got['full_fp32']} B"
        )
        assert got["share"] <= got["built"] <= got["peak"] <= limit, (rank, got)
