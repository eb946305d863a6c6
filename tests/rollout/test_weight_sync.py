"""Bucketing, packing and the transports of send_weights (HF rollout actors, real Ray)."""

import glob
import os

import pytest
import ray
import torch

from gad_ray.config.schema import RolloutConfig
from gad_ray.models.loading import load_causal_lm
from gad_ray.rollout.hf_worker import HFRolloutWorker
from gad_ray.rollout.types import SamplingParams
from gad_ray.rollout.weight_sync import (
    ALIGN,
    WeightSyncError,
    bucket_nbytes,
    iter_buckets,
    open_bucket,
    pack_bucket,
    receivers,
    resolve_sync_method,
    send_weights,
    share_bucket,
    unpack_bucket,
)

from .helpers import perturbed


@pytest.fixture(scope="module")
def workers(ray_session, tiny_model_dir):
    actor = ray.remote(HFRolloutWorker).options(num_cpus=1)
    handles = [
        actor.remote(str(tiny_model_dir), RolloutConfig(backend="hf"), "auto", 64, 0)
        for _ in range(2)
    ]
    ray.get([h.health.remote() for h in handles])
    yield handles
    for h in handles:
        ray.kill(h)


def test_pack_unpack_roundtrip_mixed_dtypes():
    tensors = [
        ("a", torch.randn(3, 5)),
        ("b", torch.randn(7).to(torch.bfloat16)),
        ("c", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
        ("d", torch.randn(4, 4).t()),  # not contiguous
    ]
    metas, flat = pack_bucket(tensors)
    assert flat.dtype == torch.uint8 and all(off % ALIGN == 0 for *_, off in metas)
    assert bucket_nbytes(metas) == flat.numel()
    for (name, t), (name2, u) in zip(tensors, unpack_bucket(metas, flat), strict=True):
        assert name == name2 and u.dtype == t.dtype and torch.equal(u, t)


def test_iter_buckets_respects_size():
    tensors = [(f"t{i}", torch.zeros(100)) for i in range(10)] + [("big", torch.zeros(5000))]
    buckets = list(iter_buckets(tensors, 1000))
    assert [len(b) for b in buckets] == [2, 2, 2, 2, 2, 1]  # 400 bytes each; big goes alone
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]


def test_resolve_sync_method_and_receivers():
    assert resolve_sync_method("auto") == "object_store"  # no CUDA here
    assert resolve_sync_method("auto", colocated=True, num_workers=2, num_senders=2) == (
        "object_store"  # CPU: ipc is no faster (docs/benchmarks.md)
    )
    assert resolve_sync_method("gloo") == "gloo"
    assert resolve_sync_method("ipc", num_workers=3) == "ipc"  # CPU: one node is enough
    with pytest.raises(ValueError, match="unknown weight sync method 'shm'"):
        resolve_sync_method("shm")
    # ipc: worker w from rank w % ranks; the other transports: rank 0 sends to all
    assert [receivers("ipc", r, 2, 3) for r in range(2)] == [[0, 2], [1]]
    assert [receivers("ipc", r, 3, 2) for r in range(3)] == [[0], [1], []]
    assert [receivers("object_store", r, 2, 3) for r in range(2)] == [[0, 1, 2], []]


def test_shared_bucket_aliases_the_senders_memory_in_another_process(workers):
    tensors = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64))]
    metas, flat, (handle,) = share_bucket(tensors, "cpu", 1)
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"  # restored

    def open_in(worker, handle):
        worker.opened = open_bucket(handle, "cpu")
        return unpack_bucket(metas, worker.opened)

    got = ray.get(workers[0].__ray_call__.remote(open_in, handle))
    assert [(n, t.tolist()) for n, t in got] == [(n, t.tolist()) for n, t in tensors]
    flat[:8] = 7  # a write by the sender shows in the receiver's tensor: no copy was made
    assert ray.get(workers[0].__ray_call__.remote(lambda w: w.opened[:9].tolist()))[:8] == [7] * 8
    ray.get(workers[0].__ray_call__.remote(lambda w: delattr(w, "opened")))
    with pytest.raises(RuntimeError, match="bucket is on elsewhere, this rollout worker's"):
        open_bucket(("elsewhere", handle[1]), "cpu")


@pytest.mark.parametrize("method", ["object_store", "gloo", "gloo", "ipc"])  # 2nd gloo: cached
def test_send_weights_reaches_every_worker(workers, tiny_model_dir, method):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    perturbed(model, seed=len(method))
    state = model.state_dict()
    stats = send_weights(state.items(), workers, 50_000, method)
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert stats["buckets"] > 1 and stats["seconds"] > 0
    expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
    for samples in ray.get(
        [w.generate.remote([[5, 6, 7]], SamplingParams.greedy(8)) for w in workers]
    ):
        assert samples[0].token_ids == expected[0, 3:].tolist()


def test_ipc_many_small_buckets_arrive_exactly_and_are_freed(workers, tiny_model_dir):
    """Buckets of 4 KiB (most tensors alone in one): every worker ends with exactly the sent
    weights, and no shared-memory file of this sender outlives the sync."""
    model = load_causal_lm(str(tiny_model_dir)).eval()
    perturbed(model, seed=7)
    state = model.state_dict()
    stats = send_weights(state.items(), workers, 4096, "ipc")
    assert stats["buckets"] >= len(state) // 2
    for got in ray.get([w.__ray_call__.remote(lambda w: w.model.state_dict()) for w in workers]):
        for k, v in state.items():
            assert torch.equal(got[k], v), k
    assert glob.glob(f"/dev/shm/torch_{os.getpid()}_*") == []


@pytest.mark.parametrize("method", ["object_store", "ipc"])
def test_receiver_error_names_the_worker(workers, method):
    with pytest.raises(
        WeightSyncError,
        match=rf"rollout worker 3 failed in bucket 0 \({method}\): KeyError.*'model.nope.weight' "
        "is not a parameter",
    ):
        send_weights([("model.nope.weight", torch.zeros(2))], workers[1:], 1024, method, [3])
