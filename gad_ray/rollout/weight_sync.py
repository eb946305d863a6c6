"""Push the generator's weights to every rollout worker, bucket by bucket.

Three transports behind :func:`send_weights`, all streaming buckets of ~``bucket_bytes`` (one
flat uint8 tensor per bucket + a list of ``(name, dtype, shape, offset)``):

- ``object_store``: each bucket is ``ray.put`` once and handed to all workers; at most two
  buckets are in flight (the sender waits for the workers' acks), so the object store never
  holds a second full copy of the model. Works everywhere; the CPU default.
- ``nccl`` / ``gloo``: a broadcast from the sender (rank 0) over a process group of its own
  (own TCPStore, built with ``ProcessGroupNCCL`` / ``ProcessGroupGloo`` directly, so neither
  the learner's default group nor vLLM's groups are touched) spanning every vLLM worker
  process (tensor-parallel ranks included). NCCL on GPU; the same code runs with gloo on CPU.
- ``ipc`` (colocated): no copy of the bucket travels. The sender packs it into memory the
  receiver can map and sends a handle made by torch's multiprocessing reductions (the pickle
  of the bucket by ``ForkingPickler``): a CUDA IPC handle on GPU (the receiver on the same GPU
  rebuilds a tensor aliasing the sender's memory), a named shared-memory file on CPU (torch's
  ``file_system`` strategy: the default ``file_descriptor`` one passes fds over a socket that
  only a multiprocessing parent and its children can authenticate to, not unrelated Ray
  actors). Each receiver gets a handle of its own (the handles carry reference counts). The
  receiver may keep views into a bucket after its ack (vLLM's layerwise reload buffers a
  layer's weights until the layer is complete), so no bucket is ever written again: each is a
  fresh allocation, kept by the sender until its receivers ack and freed by reference counting
  on both sides (on GPU through torch's IPC limbo, collected after the update).

A LoRA adapter (``send_weights(..., adapter=config)``) goes the same way; the workers collect
its tensors and serve them as a new adapter version (:meth:`RolloutWorker.finish_weight_update
<gad_ray.rollout.vllm_worker.RolloutWorker.finish_weight_update>`), the base untouched.

Receivers load buckets with vLLM's layerwise reload (``initialize_layerwise_reload`` ->
``model.load_weights`` per bucket -> ``finalize_layerwise_reload``, what
``collective_rpc("reload_weights")`` does in one go), through :class:`WeightSyncExtension`,
a vLLM ``worker_extension_cls`` that runs inside each vLLM worker process.
"""

import pickle
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

Meta = tuple[str, str, tuple[int, ...], int]  # name, dtype name, shape, byte offset in the bucket
ALIGN = 64  # byte alignment of each tensor inside a bucket (any dtype view stays valid)
GROUP_TIMEOUT = timedelta(minutes=10)
METHODS = ("object_store", "ipc", "nccl", "gloo")

_GROUPS: dict[tuple, dist.ProcessGroup] = {}  # sender-side groups, by (backend, worker ids)


def resolve_sync_method(
    method: str, colocated: bool = False, num_workers: int = 1, num_senders: int = 1
) -> str:
    """The transport for ``rollout.weight_sync``; ``num_senders`` learner ranks feed
    ``num_workers`` rollout workers.

    ``auto``: on GPU, ``ipc`` when colocated and every rollout worker shares its GPU with a
    learner rank (``num_workers <= num_senders``: rank i and worker i share GPU i), ``nccl``
    when disaggregated (NCCL cannot broadcast between processes sharing a GPU), else
    ``object_store``; on CPU ``object_store`` (a same-node object store is shared memory
    already, and ``ipc`` is no faster there: see docs/benchmarks.md). An explicit ``ipc``
    on GPU needs that colocated layout.
    """
    on_gpu = torch.cuda.is_available()
    ipc_fits = colocated and num_workers <= num_senders
    if method == "auto":
        if on_gpu and ipc_fits:
            return "ipc"
        return "nccl" if on_gpu and not colocated else "object_store"
    if method not in METHODS:
        raise ValueError(
            f"unknown weight sync method {method!r}; expected auto or one of {METHODS}"
        )
    if method == "ipc" and on_gpu and not ipc_fits:
        raise ValueError(
            "rollout.weight_sync=ipc hands CUDA memory to a rollout worker on the same GPU: it "
            "needs cluster.placement=colocated and rollout.num_workers <= the learner's ranks, got "
            f"placement {'colocated' if colocated else 'disaggregated'}, {num_workers} "
            f"workers, {num_senders} ranks"
        )
    return method


def receivers(method: str, rank: int, num_ranks: int, num_workers: int) -> list[int]:
    """The rollout workers learner rank ``rank`` sends to: under ``ipc`` worker w gets its
    weights from rank ``w % num_ranks`` (colocated: rank i and worker i share GPU i), under the
    other transports rank 0 sends to all."""
    if method == "ipc":
        return list(range(rank, num_workers, num_ranks))
    return list(range(num_workers)) if rank == 0 else []


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
    tensors: list[tuple[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    shared: bool = False,
) -> tuple[list[Meta], torch.Tensor]:
    """Copy ``tensors`` into one flat uint8 tensor on ``device``; return (metas, flat).
    ``shared``: a CPU bucket is allocated in shared memory (torch's current sharing strategy),
    so that a handle to it needs no copy (CUDA memory is always shareable)."""
    metas, offset = [], 0
    for name, t in tensors:
        metas.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    if shared and torch.device(device).type == "cpu":
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(offset))
    else:
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


IpcHandle = tuple[str, bytes]  # the sender's device_place, the bucket pickled by ForkingPickler


def device_place(device: torch.device | str) -> str:
    """Where memory on ``device`` lives: this host, and the GPU's UUID on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return socket.gethostname()
    return f"{socket.gethostname()}/GPU-{torch.cuda.get_device_properties(device).uuid}"


@contextmanager
def _file_system_sharing() -> Iterator[None]:
    """Share CPU tensors as named files in /dev/shm (torch's ``file_system`` strategy) within
    the block, then restore the process's strategy."""
    old = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        tmp.set_sharing_strategy(old)


def share_bucket(
    tensors: list[tuple[str, torch.Tensor]], device: torch.device | str, num_handles: int
) -> tuple[list[Meta], torch.Tensor, list[IpcHandle]]:
    """Pack ``tensors`` into shareable memory on ``device``; return (metas, flat, one handle
    per receiver). Keep ``flat`` alive until every receiver has opened its handle."""
    with _file_system_sharing():
        metas, flat = pack_bucket(tensors, device, shared=True)
        place = device_place(flat.device)
        handles = [(place, bytes(ForkingPickler.dumps(flat))) for _ in range(num_handles)]
    return metas, flat, handles


def open_bucket(handle: IpcHandle, device: torch.device | str) -> torch.Tensor:
    """Receiver side of ``ipc``: the sender's bucket as a tensor aliasing its memory (no copy),
    for a receiver whose weights live on ``device``. A CUDA handle opens at the sender's device
    index, which is the receiver's too when both see only their GPU (Ray sets
    CUDA_VISIBLE_DEVICES per actor: cuda:0 on both sides); anything else is an error here."""
    place, data = handle
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda": the current device
        device = torch.device("cuda", torch.cuda.current_device())
    here = device_place(device)
    if place != here:
        raise RuntimeError(
            f"ipc weight sync: the sender's bucket is on {place}, this rollout worker's weights "
            f"on {here}; ipc needs both on one node (CPU) or one GPU (colocated placement)"
        )
    flat = pickle.loads(data)
    if flat.device != device:
        raise RuntimeError(f"ipc weight sync: the bucket opened on {flat.device}, not {device}")
    return flat


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


class WeightSyncError(RuntimeError):
    """A rollout worker failed to take a weight update; the message names the worker."""


def _wait(refs: list[ray.ObjectRef], ids: list[int], step: str) -> None:
    """Wait for every worker's reply; the first failure raises :class:`WeightSyncError`."""
    for ref, i in zip(refs, ids, strict=True):
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            raise WeightSyncError(f"rollout worker {i} failed in {step}: {cause!r}") from e


def send_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    workers: list,
    bucket_bytes: int,
    method: str = "object_store",
    worker_ids: list[int] | None = None,
    adapter: dict | None = None,
) -> dict[str, float]:
    """Send HF-named full tensors to every rollout worker; return bytes, seconds, buckets.

    ``adapter``: the tensors are a LoRA adapter (peft names) and this its
    ``adapter_config.json``; the workers keep their base weights and serve the adapter as a new
    version from then on (docs/lora.md).

    Workers reload the weights and reset their prefix cache before this returns; a worker that
    fails raises :class:`WeightSyncError` naming it by ``worker_ids`` (its index in the rollout
    group; default: its position in ``workers``). ``method``: ``object_store``, ``ipc``
    (workers on this node; with CUDA, on this process's GPU), ``nccl`` (GPU) or ``gloo`` (CPU,
    same code as nccl); ``auto`` as :func:`resolve_sync_method` by default.
    """
    if method not in METHODS:
        method = resolve_sync_method(method)
    ids = list(range(len(workers))) if worker_ids is None else list(worker_ids)
    start = time.perf_counter()
    _wait([w.begin_weight_update.remote(adapter) for w in workers], ids, "begin_weight_update")
    total, n_buckets, pending = 0, 0, []
    on_gpu = torch.cuda.is_available() and method != "gloo"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if method in ("nccl", "gloo"):
        group = _sender_group(workers, method)
    for tensors in iter_buckets(named_tensors, bucket_bytes):
        keep = None  # what must outlive the bucket's acks
        if method == "object_store":
            metas, flat = pack_bucket(tensors, "cpu")
            ref = ray.put(flat.numpy())
            refs = [w.receive_bucket.remote(metas, ref) for w in workers]
        elif method == "ipc":
            metas, flat, handles = share_bucket(tensors, device, len(workers))
            refs = [w.receive_ipc.remote(metas, h) for w, h in zip(workers, handles, strict=True)]
            keep = flat
        else:
            metas, flat = pack_bucket(tensors, device)
            refs = [w.receive_broadcast.remote(metas) for w in workers]
            broadcast(group, flat)
        del flat
        pending.append((refs, n_buckets, keep))
        total += sum(t.numel() * t.element_size() for _, t in tensors)
        n_buckets += 1
        if len(pending) >= 2:  # at most two buckets in flight
            refs, k, _ = pending.pop(0)
            _wait(refs, ids, f"bucket {k} ({method})")
    for refs, k, _ in pending:
        _wait(refs, ids, f"bucket {k} ({method})")
    pending.clear()  # the sender's last buckets go; vLLM may hold views into them until finish
    _wait([w.finish_weight_update.remote() for w in workers], ids, "finish_weight_update")
    if method == "ipc" and torch.cuda.is_available():
        torch.cuda.ipc_collect()  # free the sent blocks the receivers have released
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

    def gad_load_ipc(self, metas: list[Meta], handle: IpcHandle) -> None:
        self.gad_load_bucket(metas, open_bucket(handle, self.device))

    def gad_join_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        self._gad_group = join_weight_group(
            host, port, rank_offset + self.rank, world_size, backend
        )

    def gad_recv_broadcast(self, metas: list[Meta]) -> None:
        self.gad_load_bucket(metas, self.gad_recv_flat(metas))

    def gad_recv_flat(self, metas: list[Meta]) -> torch.Tensor:
        flat = torch.empty(bucket_nbytes(metas), dtype=torch.uint8, device=self.device)
        broadcast(self._gad_group, flat)
        return flat

    def gad_recv_adapter(self, metas: list[Meta]) -> list[tuple[str, torch.Tensor]]:
        """A broadcast bucket of LoRA adapter tensors, returned (on CPU) to the engine's owner."""
        return [(n, t.cpu().clone()) for n, t in unpack_bucket(metas, self.gad_recv_flat(metas))]

    def gad_finish_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._gad_model(), self.model_config)
