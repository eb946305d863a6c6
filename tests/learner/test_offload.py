"""Offloading an idle learner (``Engine.offload`` / ``onload``), memory stats, freed gradients.

There is no GPU here: a learner's device is the CPU, so a plain offload moves nothing. The
``copy=True`` moves copy every tensor into new storage even then, which exercises the real
moves: the state must survive bitwise and the old storage must be freed (nothing, FSDP2's
sharded-parameter bookkeeping included, may keep pointing at it).
"""

import gc
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml
from torch.distributed.fsdp import FSDPModule
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import AutoModelForCausalLM

from gad_ray.config.schema import ConfigError
from gad_ray.discriminator import DiscriminatorGroup
from gad_ray.hydra_app import CONF_DIR
from gad_ray.learner import FSDP2Engine, GeneratorGroup
from gad_ray.learner.offload import CPU, move_module, move_optimizer_state
from gad_ray.memory import memory_stats
from tests.config_builder import learner_config
from tests.learner.conftest import make_token_batch

T = 0.8  # the temperature the GRPO batches are taken to be sampled at

# the in-worker probes below live in this test module: ship them to the actors by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMINGS = ("tokens_per_s", "step_s")


def _storages(tensors: list[torch.Tensor]) -> list[StorageWeakRef]:
    return [StorageWeakRef(t.untyped_storage()) for t in tensors if t.numel()]


def _alive(refs: list[StorageWeakRef]) -> int:
    gc.collect()
    return sum(not r.expired() for r in refs)


def _sft_step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_moves_copy_into_new_storage_keep_objects_and_free_the_old(tiny_model_dir):
    """move_module + move_optimizer_state with copy=True on CPU: a real move. The Parameter
    and state-key objects stay, values are bitwise equal, the old storage is freed, and the
    next steps equal those of an unmoved twin; without copy nothing moves."""
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    twins = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _sft_step(model, opt, ids)
        twins.append((model, opt))
    (model, opt), (twin, twin_opt) = twins

    params = list(model.parameters())
    state = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    before = [t.clone() for t in params + state]
    ptrs = [t.data_ptr() for t in params + state]
    move_module(model, CPU)
    move_optimizer_state(opt, CPU)
    assert [p.data_ptr() for p in model.parameters()] == ptrs[: len(params)]  # no-op

    old = _storages(params + state)
    del state  # our own references would keep the old optimizer state alive
    move_module(model, CPU, copy=True)
    move_optimizer_state(opt, CPU, copy=True)
    assert _alive(old) == 0
    assert list(model.parameters()) == params and set(opt.state) == set(params)
    moved = list(model.parameters()) + [
        v for s in opt.state.values() for k, v in s.items() if k != "step"
    ]
    for a, b in zip(moved, before, strict=True):
        assert torch.equal(a, b)

    for _ in range(2):
        assert _sft_step(model, opt, ids) == _sft_step(twin, twin_opt, ids)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_memory_stats_on_cpu_track_rss_and_reset_the_peak():
    """CPU stats are the process RSS: a 400 MB tensor raises the peak by about that much, the
    peak stays after it is freed, and a reset brings the peak back down."""
    base = memory_stats(CPU, reset=True)
    assert 0 < base["current_gb"] <= base["peak_gb"]
    x = torch.ones(100_000_000)  # 0.4 GB, touched
    during = memory_stats(CPU)
    del x
    after = memory_stats(CPU, reset=True)
    assert during["current_gb"] - base["current_gb"] > 0.38
    assert after["peak_gb"] > during["current_gb"] - 0.01  # the kernel's counters lag a little
    assert memory_stats(CPU)["peak_gb"] < after["peak_gb"] - 0.3


# -- in-worker probes (run in the learner actors through __ray_call__) -----------------------
def _state_tensors(w) -> list[torch.Tensor]:
    """The tensors of a worker's trained state and reference that a copying offload must
    replace (ZeRO-2's optimizer state is left out: DeepSpeed moves it with a plain ``.to``,
    which does not copy from CPU to CPU)."""
    eng, ref = w.engine, w.reference
    out: list[torch.Tensor] = []
    if isinstance(eng, FSDP2Engine):
        opt = eng.optimizer
        for m in (eng.module, ref):
            out += [p._local_tensor for p in m.parameters()]
            for sub in m.modules():  # FSDP2's own references to the sharded parameters
                if isinstance(sub, FSDPModule):
                    for group in sub._get_fsdp_state()._fsdp_param_groups:
                        out += [fp._sharded_param_data for fp in group.fsdp_params]
    elif eng.zero_stage == 2:
        zero = eng.ds.optimizer
        return (
            zero.single_partition_of_fp32_groups + zero.bit16_groups_flat + list(ref.parameters())
        )
    else:
        zero, opt = eng.ds.optimizer, eng.ds.optimizer.optimizer
        out += zero.fp32_partitioned_groups_flat + [zero.lp_param_buffer]
        out += [zero.grad_partitions_flat_buffer]
        out += [p.ds_tensor for p in ref.module.parameters()]
    return out + [v for s in opt.state.values() for k, v in s.items() if k != "step"]


def _copy_round_trip(w) -> tuple[int, int, int]:
    """(old tensors still alive after offload(copy), after onload(copy), how many)."""
    old = _storages(_state_tensors(w))
    w.offload(copy=True)
    alive_off = _alive(old)
    old_on = _storages(_state_tensors(w))
    w.onload(copy=True)
    return alive_off, _alive(old_on), len(old)


def _grads_left(w) -> int:
    return sum(p.grad is not None for p in w.engine.module.parameters())


def _zero2_grads_left(w) -> int:
    """ZeRO-2 gradient state alive between steps: reduced partitions, bucket buffers, grads of
    the fp32 masters."""
    zero = w.engine.ds.optimizer
    left = sum(v is not None for v in zero.averaged_gradients.values())
    left += sum(len(b.buffer) for b in zero.ipg_buckets.values())
    return left + sum(t.grad is not None for t in zero.single_partition_of_fp32_groups)


def _zero3_grad_buffers(w) -> dict[str, int | None]:
    """ZeRO-3's persistent gradient buffers: the rank's gradient partition and the reduce
    bucket(s) (``reduce_bucket_size`` elements, None while freed)."""
    zero = w.engine.ds.optimizer
    buckets = [b.buffer for b in zero.ipg_buckets.values()]
    return {
        "partition": zero.grad_partitions_flat_buffer.numel(),
        "partition_expected": sum(t.numel() for t in zero.fp32_partitioned_groups_flat),
        "bucket": None if any(b is None for b in buckets) else sum(b.numel() for b in buckets),
    }


def _in_workers(group, fn):
    return ray.get([w.__ray_call__.remote(fn) for w in group.workers])


def _without_timings(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMINGS}


def _assert_same(group_a, group_b, ma: dict, mb: dict) -> None:
    assert _without_timings(ma) == _without_timings(mb)  # bitwise
    pa, pb = group_a.full_params(), group_b.full_params()
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


CASES = [
    pytest.param("fsdp", 3, 2, id="fsdp-2ranks"),
    pytest.param("fsdp", 3, 1, id="fsdp-1rank"),
    pytest.param("deepspeed", 2, 2, id="zero2-2ranks"),
    pytest.param("deepspeed", 2, 1, id="zero2-1rank"),
    pytest.param("deepspeed", 3, 2, id="zero3-2ranks"),
    pytest.param("deepspeed", 3, 1, id="zero3-1rank"),
]


@pytest.mark.parametrize(("backend", "stage", "ranks"), CASES)
def test_offload_round_trip_gives_the_same_steps_as_without(
    backend, stage, ranks, ray_session, tiny_model_dir, tmp_path
):
    """Two identical groups (policy + GRPO reference), one offloaded between steps: a real
    copy round trip, a checkpoint saved while offloaded, an automatic onload by a training
    step. Every step's metrics and the fp32 masters stay bitwise equal to the group that never
    offloads; the checkpoint saved while offloaded resumes to the same step; no parameter holds
    a gradient after a step."""
    cfg = learner_config(
        tiny_model_dir,
        backend=backend,
        zero_stage=stage,
        generator_ranks=ranks,
        offload_idle=True,
    )
    b1, b2, b3 = (make_token_batch(seed=s, n=6) for s in (1, 2, 3))
    adv2, adv3 = torch.randn(6), torch.randn(6)
    base, off = GeneratorGroup(cfg), GeneratorGroup(cfg)
    try:
        _assert_same(base, off, base.train_sft(b1), off.train_sft(b1))
        assert _in_workers(off, _grads_left) == [0] * ranks  # set_to_none after the step
        if backend == "deepspeed" and stage == 2:  # nothing of the gradients outlives a step
            assert _in_workers(off, _zero2_grads_left) == [0] * ranks
        if backend == "deepspeed" and stage == 3:  # ZeRO-3 keeps its gradient buffers
            for g in _in_workers(off, _zero3_grad_buffers):
                assert g["bucket"] >= 5e8 and g["partition"] == g["partition_expected"]

        # a real move there and back: nothing keeps the old storage, the state is bitwise equal
        for alive_off, alive_on, n in _in_workers(off, _copy_round_trip):
            assert n > 0 and alive_off == 0
            if backend == "fsdp":  # DeepSpeed's reload onto the CPU is a no-op (no copy)
                assert alive_on == 0
        assert not off.is_offloaded()

        seconds = off.offload()
        assert off.is_offloaded() and len(seconds) == ranks and all(s >= 0 for s in seconds)
        if backend == "deepspeed" and stage == 3:  # offload frees ZeRO-3's reduce bucket
            assert all(g["bucket"] is None for g in _in_workers(off, _zero3_grad_buffers))
        off.save_checkpoint(str(tmp_path / "ckpt"))  # onloads for the save, offloads again
        assert off.is_offloaded()
        m2 = off.train_grpo(b2, adv2, temperature=T)  # onloads automatically and stays onloaded
        assert not off.is_offloaded() and m2["kl"] > 0
        _assert_same(base, off, base.train_grpo(b2, adv2, temperature=T), m2)
        after2 = off.full_params()

        assert len(off.onload()) == ranks  # onloading an onloaded learner does nothing
        off.offload(copy=True)
        _assert_same(
            base,
            off,
            base.train_grpo(b3, adv3, temperature=T),
            off.train_grpo(b3, adv3, temperature=T),
        )
        assert _in_workers(off, _grads_left) == [0] * ranks
        if backend == "deepspeed" and stage == 3:  # ...and the bucket comes back for the step
            for g in _in_workers(off, _zero3_grad_buffers):
                assert g["bucket"] >= 5e8 and g["partition"] == g["partition_expected"]

        off.offload()
        off.load_checkpoint(str(tmp_path / "ckpt"))  # the one saved while offloaded
        assert off.is_offloaded()
        again = off.train_grpo(b2, adv2, temperature=T)
        assert _without_timings(again) == _without_timings(m2)
        for k, v in off.full_params().items():
            assert torch.equal(v, after2[k]), k

        stats = off.memory_stats(reset=True)
        model_bytes = sum(v.numel() * 4 for v in after2.values())
        assert stats["peak_gb"] >= stats["current_gb"] > model_bytes / 1e9
    finally:
        base.shutdown()
        off.shutdown()


def test_offloaded_discriminator_scores_and_trains_like_before(ray_session, tiny_model_dir):
    """D (no frozen model): scores survive a copying round trip bitwise; scoring while
    offloaded onloads; a BT step after an offload equals the scores' own step."""
    cfg = learner_config(tiny_model_dir, discriminator_ranks=2, offload_idle=True)
    teacher, student = make_token_batch(seed=7, n=2), make_token_batch(seed=8, n=4)
    group = DiscriminatorGroup(cfg)
    try:
        before = group.score(student)
        group.offload(copy=True)
        assert group.is_offloaded()
        assert torch.equal(group.score(student), before) and not group.is_offloaded()
        group.offload()
        out = group.train_bt(teacher, student, torch.tensor([0, 0, 1, 1]))
        assert out["d_loss"] > 0 and not group.is_offloaded()
        assert _in_workers(group, _grads_left) == [0, 0]
        assert not torch.equal(group.score(student), before)  # the step moved D
    finally:
        group.shutdown()


def test_offload_idle_config(tiny_model_dir):
    """The knob defaults to off in both learner presets; DeepSpeed ZeRO-3 with param_offload
    cannot offload its states and is refused naming the keys."""
    conf = Path(CONF_DIR) / "learner"
    for preset in ("fsdp", "deepspeed"):
        assert yaml.safe_load((conf / f"{preset}.yaml").read_text())["offload_idle"] is False
    assert learner_config(tiny_model_dir).learner.offload_idle is False
    for backend, stage in (("fsdp", 3), ("deepspeed", 2), ("deepspeed", 3)):
        learner_config(tiny_model_dir, backend=backend, zero_stage=stage, offload_idle=True)
    with pytest.raises(ConfigError, match=r"learner.offload_idle=true .*param_offload=true"):
        learner_config(
            tiny_model_dir, backend="deepspeed", zero_stage=3, param_offload=True, offload_idle=True
        )
