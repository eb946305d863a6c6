"""Loading once (gad_ray/learner/load_once.py): with 2 ranks only rank 0 opens the weight files,
rank 1 builds its models empty, and every rank's parameters equal a normal load, bitwise: G and
its reference, D (its fresh, seeded head), G's LoRA stack (adapters and the frozen reference
adapter) and the shared base, under FSDP2 and DeepSpeed ZeRO-2/3 (fp32 and bf16 compute).

Each case runs the learners' real ``setup`` on two spawned processes (tests/learner/ranks.py),
which record every weight file they open from their start."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from gad_ray.config.schema import Config, validate_config
from gad_ray.discriminator.model import DiscriminatorModel
from gad_ray.learner.lora import GENERATOR, REFERENCE, AdapterModel, add_adapters, copy_adapter
from gad_ray.models.loading import load_causal_lm
from tests.learner.conftest import make_cfg
from tests.learner.ranks import run_ranks, weight_files_opened

LORA = {"rank": 4, "alpha": 8.0}
SEED = 7


def _cfg(model_dir, backend: str, stage: int, dtype: str, lora: bool) -> Config:
    raw = make_cfg(model_dir, backend=backend, zero_stage=stage).model_dump()
    raw["seed"] = SEED
    for who in ("student", "discriminator"):
        raw["model"][who]["dtype"] = dtype
        raw["model"][who]["lora"] = LORA if lora else {"rank": 0}
    raw["learner"]["shared_base"] = lora and backend == "fsdp"
    return validate_config(raw, check_model_context=False)


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
    from gad_ray.learner.generator import GeneratorWorker
    from gad_ray.learner.shared import SharedWorker

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
    if backend == "fsdp":
        shared = SharedWorker(lora, rank, world, "shared", 1, model_dir, model_dir, True, None)
        shared.setup()
        out["shared"] = dict(shared.engine.named_full_params())
    out["opened"] = weight_files_opened()
    dist.barrier()
    return out


def _expected(model_dir, backend: str, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """A normal load, in one process, of what each learner holds: trained weights as fp32
    masters (DeepSpeed's are copies of its compute-dtype weights), frozen ones in ``dtype``."""
    path = str(model_dir)
    master = (lambda t: t.to(dtype).float()) if backend == "deepspeed" else (lambda t: t)  # noqa: E731

    def params(model: torch.nn.Module, cast) -> dict[str, torch.Tensor]:  # noqa: ANN001
        return {n: cast(p.detach()) for n, p in model.named_parameters()}

    want = {
        "g": params(load_causal_lm(path, torch.float32), master),
        "ref": params(load_causal_lm(path, dtype), lambda t: t),
        "d": params(
            DiscriminatorModel.from_pretrained(path, torch.float32, SEED, torch.float32), master
        ),
    }
    lora_spec = _cfg(path, "fsdp", 3, "float32", lora=True).model.student.lora
    lm = add_adapters(
        load_causal_lm(path, dtype), {GENERATOR: lora_spec, REFERENCE: lora_spec}, SEED
    )
    copy_adapter(lm, GENERATOR, REFERENCE)
    lora = params(AdapterModel(lm), lambda t: t)
    if backend == "deepspeed":  # every parameter of a DeepSpeed module is in the compute dtype
        lora = {n: t.to(dtype).float() for n, t in lora.items()}
    else:  # the adapters are fp32 masters, the frozen base is in the compute dtype
        lora = {n: t if ".lora_" in n else t.to(dtype) for n, t in lora.items()}
    want["g_lora"] = lora
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
        if backend == "fsdp":  # the shared base: G's stack plus D's adapter and seeded head
            shared = got["shared"]
            for name, t in want["g_lora"].items():
                assert torch.equal(shared[name].cpu(), t), f"rank {rank} shared: {name}"
            assert torch.equal(shared["score.weight"], want["d"]["score.weight"])
