"""Push the generator's weights to every rollout worker, bucket by bucket.

Two transports behind :func:`send_weights`, both streaming buckets of ~``bucket_bytes`` (one
flat uint8 tensor per bucket + a list of ``(name, dtype, shape, offset)``):

- ``object_store``: each bucket is ``ray.put`` once and handed to all workers; at most two
  buckets are in flight (the sender waits for the workers' acks), so the object store never
  holds a second full copy of the model. Works everywhere; the CPU default.
- ``nccl`` / ``gloo``: a broadcast from the sender (rank 0) over a process group of its own
  (own TCPStore, built with ``ProcessGroupNCCL`` / ``ProcessGroupGloo`` directly, so neither
  the learner's default group nor vLLM's groups are touched) spanning every vLLM worker
  process (tensor-parallel ranks included). NCCL on GPU; the same code runs with gloo on CPU.

Receivers load buckets with vLLM's layerwise reload (``initialize_layerwise_reload`` ->
``model.load_weights`` per bucket -> ``finalize_layerwise_reload``, what
``collective_rpc("reload_weights")`` does in one go), through :class:`WeightSyncExtension`,
a vLLM ``worker_extension_cls`` that runs inside each vLLM worker process.
"""

import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

Meta = tuple[str, str, tuple[int, ...], int]  # name, dtype name, shape, byte offset in the bucket
ALIGN = 64  # byte alignment of each tensor inside a bucket (any dtype view stays valid)
GROUP_TIMEOUT = timedelta(minutes=10)
METHODS = ("object_store", "nccl", "gloo")

_GROUPS: dict[tuple, dist.ProcessGroup] = {}  # sender-side groups, by (backend, worker ids)


def resolve_sync_method(method: str, colocated: bool = False) -> str:
    """``auto`` -> ``nccl`` when CUDA is available and rollout and learner GPUs are distinct
    (NCCL cannot broadcast between processes sharing a GPU), else ``object_store``."""
    if method == "auto":
        return "nccl" if torch.cuda.is_available() and not colocated else "object_store"
    if method not in METHODS:
        raise ValueError(
            f"unknown weight sync method {method!r}; expected auto or one of {METHODS}"
        )
    return method


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of ~``bucket_bytes`` (a larger tensor gets a bucket alone)."""
    bucket, size = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def pack_bucket(
    tensors: list[tuple[str, torch.Tensor]], device: torch.device | str = "cpu"
) -> tuple[list[Meta], torch.Tensor]:
    """Copy ``tensors`` into one flat uint8 tensor on ``device``; return (metas, flat)."""
    metas, offset = [], 0
    for name, t in tensors:
        metas.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, _, _, off), (_, t) in zip(metas, tensors, strict=True):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[off : off + raw.numel()].copy_(raw)
    return metas, flat


def unpack_bucket(metas: list[Meta], flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into ``flat`` (no copy), one per meta."""
    out = []
    for name, dtype, shape, off in metas:
        dt = getattr(torch, dtype)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        out.append((name, flat[off : off + nbytes].view(dt).view(shape)))
    return out


def bucket_nbytes(metas: list[Meta]) -> int:
    """Size of the flat tensor that holds ``metas``."""
    name, dtype, shape, off = metas[-1]
    size = torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return off + -(-size // ALIGN) * ALIGN


def _new_group(store: dist.Store, rank: int, world_size: int, backend: str) -> dist.ProcessGroup:
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, GROUP_TIMEOUT)
    raise ValueError(f"unknown weight-sync backend {backend!r}; expected 'nccl' or 'gloo'")


def join_weight_group(
    host: str, port: int, rank: int, world_size: int, backend: str
) -> dist.ProcessGroup:
    """Receiver side: connect to the sender's TCPStore and build the broadcast group."""
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=GROUP_TIMEOUT)
    return _new_group(store, rank, world_size, backend)


def broadcast(group: dist.ProcessGroup, flat: torch.Tensor) -> None:
    """Broadcast ``flat`` in place from rank 0 of ``group``."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([flat], opts).wait()


def _sender_group(workers: list, backend: str) -> dist.ProcessGroup:
    """The sender's group with ``workers`` (created on first use, then cached)."""
    key = (backend, *(w._actor_id.hex() for w in workers))
    if key not in _GROUPS:
        sizes = ray.get([w.weight_group_size.remote() for w in workers])
        world_size = 1 + sum(sizes)
        host = ray.util.get_node_ip_address()
        store = dist.TCPStore(
            host, 0, world_size, is_master=True, timeout=GROUP_TIMEOUT, wait_for_workers=False
        )
        offsets = [1 + sum(sizes[:i]) for i in range(len(workers))]
        joins = [
            w.init_weight_group.remote(host, store.port, off, world_size, backend)
            for w, off in zip(workers, offsets, strict=True)
        ]
        _GROUPS[key] = _new_group(store, 0, world_size, backend)
        ray.get(joins)
    return _GROUPS[key]


def send_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    workers: list,
    bucket_bytes: int,
    method: str = "object_store",
) -> dict[str, float]:
    """Send HF-named full tensors to every rollout worker; return bytes, seconds, buckets.

    Workers reload the weights and reset their prefix cache before this returns.
    ``method``: ``object_store``, ``nccl`` (GPU tensors) or ``gloo`` (CPU, same code as nccl).
    """
    method = resolve_sync_method(method)
    start = time.perf_counter()
    ray.get([w.begin_weight_update.remote() for w in workers])
    total, n_buckets, pending = 0, 0, []
    if method != "object_store":
        group = _sender_group(workers, method)
        device = torch.device("cuda", torch.cuda.current_device()) if method == "nccl" else "cpu"
    for tensors in iter_buckets(named_tensors, bucket_bytes):
        if method == "object_store":
            metas, flat = pack_bucket(tensors, "cpu")
            ref = ray.put(flat.numpy())
            pending.append([w.receive_bucket.remote(metas, ref) for w in workers])
        else:
            metas, flat = pack_bucket(tensors, device)
            pending.append([w.receive_broadcast.remote(metas) for w in workers])
            broadcast(group, flat)
        del flat
        total += sum(t.numel() * t.element_size() for _, t in tensors)
        n_buckets += 1
        if len(pending) >= 2:  # at most two buckets in flight
            ray.get(pending.pop(0))
    for refs in pending:
        ray.get(refs)
    ray.get([w.finish_weight_update.remote() for w in workers])
    return {"bytes": total, "seconds": time.perf_counter() - start, "buckets": n_buckets}


class WeightSyncExtension:
    """vLLM ``worker_extension_cls``: methods run inside each vLLM worker (``self`` is the
    worker) through ``llm.collective_rpc("gad_...")``."""

    def _gad_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def gad_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import (
            initialize_layerwise_reload,
        )

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._gad_model())

    def gad_load_bucket(self, metas: list[Meta], flat: torch.Tensor) -> None:
        from vllm.config import set_current_vllm_config

        flat = flat.to(self.device)
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self._gad_model().load_weights(unpack_bucket(metas, flat))

    def gad_join_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        self._gad_group = join_weight_group(
            host, port, rank_offset + self.rank, world_size, backend
        )

    def gad_recv_broadcast(self, metas: list[Meta]) -> None:
        flat = torch.empty(bucket_nbytes(metas), dtype=torch.uint8, device=self.device)
        broadcast(self._gad_group, flat)
        self.gad_load_bucket(metas, flat)

    def gad_finish_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._gad_model(), self.model_config)
