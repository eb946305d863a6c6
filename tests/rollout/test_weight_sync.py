"""Bucketing, packing and both transports of send_weights (HF rollout actors, real Ray)."""

import pytest
import ray
import torch

from gad_ray.config.schema import RolloutConfig
from gad_ray.models.loading import load_causal_lm
from gad_ray.rollout.hf_worker import HFRolloutWorker
from gad_ray.rollout.weight_sync import (
    ALIGN,
    bucket_nbytes,
    iter_buckets,
    pack_bucket,
    resolve_sync_method,
    send_weights,
    unpack_bucket,
)

from .helpers import perturbed


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    ray.init(num_cpus=4, include_dashboard=False)
    actor = ray.remote(HFRolloutWorker).options(num_cpus=1)
    handles = [
        actor.remote(str(tiny_model_dir), RolloutConfig(backend="hf"), "auto", 64, 0)
        for _ in range(2)
    ]
    ray.get([h.health.remote() for h in handles])
    yield handles
    ray.shutdown()


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


def test_resolve_sync_method():
    assert resolve_sync_method("auto") == "object_store"  # no CUDA here
    assert resolve_sync_method("gloo") == "gloo"
    with pytest.raises(ValueError, match="unknown weight sync method 'shm'"):
        resolve_sync_method("shm")


@pytest.mark.parametrize("method", ["object_store", "gloo", "gloo"])  # 2nd gloo: cached group
def test_send_weights_reaches_every_worker(workers, tiny_model_dir, method):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    perturbed(model, seed=len(method))
    state = model.state_dict()
    stats = send_weights(state.items(), workers, 50_000, method)
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert stats["buckets"] > 1 and stats["seconds"] > 0
    expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
    for samples in ray.get([w.generate.remote([[5, 6, 7]], 1, 0.0, 1.0, 8) for w in workers]):
        assert samples[0].token_ids == expected[0, 3:].tolist()


def test_unknown_weight_name_is_rejected(workers):
    with pytest.raises(KeyError, match="'model.nope.weight' is not a parameter"):
        send_weights([("model.nope.weight", torch.zeros(2))], workers[:1], 1024, "object_store")
