"""Loading once (gad_ray/learner/load_once.py): with 2 ranks only rank 0 opens the weight files,
rank 1 builds its models empty, and every rank's parameters equal a normal load, bitwise: G and
its reference, D (with its fresh head, drawn from the seed on rank 0), G's LoRA stack (adapters
and the frozen reference adapter), D's LoRA stack and, under FSDP2, the shared base (G's, the
reference's and D's adapters and D's head); under FSDP2 (bf16 compute) and DeepSpeed ZeRO-2
(fp32) and ZeRO-3 (bf16). The same test fails before loading once: rank 1 reads the weights.

Each case runs the learners' real ``setup`` on two spawned processes (tests/learner/ranks.py),
which record every weight file they open from their start."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gad_ray.config.schema import Config
from gad_ray.discriminator.model import DiscriminatorModel, discriminator_config, new_head
from gad_ray.learner.lora import (
    DISCRIMINATOR,
    GENERATOR,
    REFERENCE,
    AdapterModel,
    add_adapters,
    copy_adapter,
)
from gad_ray.models.loading import load_causal_lm
from tests.config_builder import learner_config, make_config
from tests.learner.ranks import run_ranks, weight_files_opened

LORA = {"rank": 4, "alpha": 8.0}
SEED = 7


def _cfg(model_dir, backend: str, stage: int, dtype: str, lora: bool) -> Config:
    spec = LORA if lora else {"rank": 0}
    return make_config(
        base=learner_config(model_dir, backend=backend, zero_stage=stage),
        seed=SEED,
        model__student__dtype=dtype,
        model__student__lora=spec,
        model__discriminator__dtype=dtype,
        model__discriminator__lora=spec,
        learner__shared_base=lora and backend == "fsdp",
    )


def _gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a (sharded) module, full, on every rank (collective)."""
    out = {}
    for name, p in getattr(module, "module", module).named_parameters():
        if isinstance(p, DTensor):
            out[name] = p.detach().full_tensor().clone()
        elif hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().clone()
        else:
            out[name] = p.detach().clone()
    return out


def build_learners(
    rank: int, world: int, port: int, model_dir: str, backend: str, stage: int, dtype: str
) -> dict:
    """On each rank: G with its reference, D, then (LoRA) G's adapter stack and, under FSDP2,
    the shared base; what each holds, full, and the weight files this rank opened."""
    from gad_ray.discriminator.learner import DiscriminatorWorker
    from gad_ray.discriminator.shared import SharedWorker
    from gad_ray.learner.generator import GeneratorWorker

    out: dict = {}
    cfg = _cfg(model_dir, backend, stage, dtype, lora=False)
    g = GeneratorWorker(cfg, rank, world, "generator", 1, model_dir, True, None)
    g.init_distributed("127.0.0.1", port)  # the process group, then setup()
    out["g"] = dict(g.engine.named_full_params())
    out["ref"] = _gathered(g.reference)
    d = DiscriminatorWorker(cfg, rank, world, "discriminator", 1, model_dir, model_dir, None)
    d.setup()
    out["d"] = dict(d.engine.named_full_params())
    lora = _cfg(model_dir, backend, stage, dtype, lora=True)
    g_lora = GeneratorWorker(lora, rank, world, "generator", 1, model_dir, True, None)
    g_lora.setup()
    out["g_lora"] = dict(g_lora.engine.named_full_params())
    d_lora = DiscriminatorWorker(lora, rank, world, "discriminator", 1, model_dir, model_dir, None)
    d_lora.setup()
    out["d_lora"] = dict(d_lora.engine.named_full_params())
    if backend == "fsdp":
        shared = SharedWorker(lora, rank, world, "shared", 1, model_dir, model_dir, True, None)
        shared.setup()
        out["shared"] = dict(shared.engine.named_full_params())
    out["opened"] = weight_files_opened()
    dist.barrier()
    return out


def _expected(model_dir, backend: str, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """A normal load, in one process, of what each learner holds: trained weights as fp32
    masters, frozen ones in the compute ``dtype`` (a LoRA base, the reference); under DeepSpeed
    every module parameter is in ``dtype`` and the masters are its copies."""
    path, spec = str(model_dir), _cfg(model_dir, "fsdp", 3, "float32", lora=True).model.student.lora

    def stack(more: dict) -> AdapterModel:  # G's LoRA stack (a base of its own or the shared one)
        lm = add_adapters(
            load_causal_lm(path, dtype), {GENERATOR: spec, REFERENCE: spec} | more, SEED
        )
        copy_adapter(lm, GENERATOR, REFERENCE)
        return AdapterModel(lm)

    d_lora = DiscriminatorModel.from_pretrained(path, dtype, SEED, torch.float32)
    d_lora.model = add_adapters(d_lora.model, {DISCRIMINATOR: spec}, SEED)
    shared = stack({DISCRIMINATOR: spec})
    shared.score = new_head(discriminator_config(shared.config), SEED)
    models = {
        "g": load_causal_lm(path, torch.float32),
        "d": DiscriminatorModel.from_pretrained(path, torch.float32, SEED, torch.float32),
        "g_lora": stack({}),
        "d_lora": d_lora,
    } | ({"shared": shared} if backend == "fsdp" else {})
    cast = (lambda t: t.to(dtype).float()) if backend == "deepspeed" else (lambda t: t)  # noqa: E731
    want = {k: {n: cast(p.detach()) for n, p in m.named_parameters()} for k, m in models.items()}
    want["ref"] = {n: p.detach() for n, p in load_causal_lm(path, dtype).named_parameters()}
    return want


CASES = [("fsdp", 3, "bfloat16"), ("deepspeed", 2, "float32"), ("deepspeed", 3, "bfloat16")]


@pytest.mark.parametrize(("backend", "stage", "dtype"), CASES)
def test_only_rank0_reads_weights_and_every_rank_holds_a_normal_load(
    backend, stage, dtype, tiny_model_dir
):
    ranks = run_ranks(
        f"{__name__}:build_learners",
        model_dir=str(tiny_model_dir),
        backend=backend,
        stage=stage,
        dtype=dtype,
    )
    weights = str(tiny_model_dir / "model.safetensors")
    assert weights in ranks[0]["opened"]  # the recorder sees rank 0's reads
    assert ranks[1]["opened"] == []  # rank 1 never opens a weight file

    want = _expected(tiny_model_dir, backend, getattr(torch, dtype))
    for rank, got in enumerate(ranks):
        for key, expected in want.items():
            assert set(got[key]) == set(expected), (rank, key, set(got[key]) ^ set(expected))
            for name, t in expected.items():
                assert torch.equal(got[key][name].cpu(), t), f"rank {rank} {key}: {name}"
