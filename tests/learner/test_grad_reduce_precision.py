"""DeepSpeed reduces and accumulates gradients in fp32 under bf16 compute, as FSDP2 does here.

Two spawned ranks (tests/learner/ranks.py) train G with bf16 compute and gradient checkpointing
(the GPU presets' path): four micro-batches per rank accumulate into one step. The reduced,
accumulated gradient (full, fp32) before the optimizer step, the pre-clip norm and the fp32
masters after the step are compared between FSDP2 (``reduce_dtype=fp32``) and DeepSpeed ZeRO-2
and ZeRO-3, with this repo's config and with DeepSpeed's own defaults (``communication_data_type``
and ``grad_accum_dtype`` follow bf16), which the test shows to be off by bf16 rounding.

No clipping (``grad_clip: null``; DeepSpeed clips at 1.0 unless its config says 0, as this repo's
now does), so the step's gradient is the reduced one; each backend's pre-clip norm is compared
with the fp64 norm of the gradient.

The weights are bf16-representable (rounded once, as a released bf16 checkpoint is), so both
backends start from the same fp32 masters and compute bitwise the same bf16 micro-batch
gradients; what remains is the reduction and accumulation, each a few fp32 additions of the same
values: GRAD_TOL (relative to the tensor's largest gradient) allows 8 fp32 roundings (2^-24 each)
with margin, while one bf16 rounding alone is 2^-9.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.learner.conftest import make_token_batch
from tests.learner.ranks import run_ranks

GRAD_TOL = 1e-6
MICRO_BATCHES, ROWS = 4, 2  # per rank


def full_grads(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Each parameter's reduced, accumulated gradient, full, fp32, on every rank (collective):
    read before the step (FSDP2's sharded grads, ZeRO-3's gradient partitions)."""
    from torch.distributed.tensor import DTensor

    if hasattr(engine, "ds"):
        from deepspeed.utils import safe_get_full_grad

        params = engine.ds.module.named_parameters()
        return {name: safe_get_full_grad(p).float().clone() for name, p in params}
    out = {}
    for name, p in engine.module.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).float().clone()
    return out


def zero2_grads_at_step(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """ZeRO-2 frees its gradient partitions' per-parameter views before the inner optimizer
    runs: the returned dict fills at the step, from the flat fp32 gradient the optimizer is
    handed, each parameter's fragment put at its place and summed over ranks."""
    import torch.distributed as dist

    zero, out = engine.ds.optimizer, {}

    def read(*_) -> None:  # noqa: ANN002
        for name, p in engine.ds.module.named_parameters():
            full = torch.zeros(p.numel(), dtype=torch.float32)
            m = p._hp_mapping
            if m is not None:
                flat = zero.single_partition_of_fp32_groups[m.param_group_index].grad
                dst, src = m.lp_fragment_address, m.hp_fragment_address
                full.narrow(0, dst.start, dst.numel).copy_(flat.narrow(0, src.start, src.numel))
            dist.all_reduce(full)
            out[name] = full.view(p.shape)

    zero.optimizer.register_step_pre_hook(read)
    return out


def steps(rank: int, world: int, port: int, model_dir: str) -> dict:
    """One accumulated step per backend from the same start; rank 0 returns what it saw."""
    import torch.distributed as dist

    from gad_ray.algorithms import aggregate_loss, sft_loss_mat
    from gad_ray.config.schema import LearnerConfig, OptimConfig
    from gad_ray.learner import deepspeed_engine
    from gad_ray.learner.backends import build_engine
    from gad_ray.learner.generator import policy_logprobs
    from gad_ray.models.loading import load_causal_lm

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    batch = make_token_batch(seed=11, n=world * MICRO_BATCHES * ROWS)
    den = float(batch.response_mask.sum())  # the global token-mean's denominator
    mine = list(range(rank * MICRO_BATCHES * ROWS, (rank + 1) * MICRO_BATCHES * ROWS))
    optim = OptimConfig(lr=1e-6, grad_clip=None, weight_decay=0.0)  # no clipping
    cases = {
        "fsdp": ("fsdp", 3),
        "zero2": ("deepspeed", 2),
        "zero3": ("deepspeed", 3),
        "zero2_bf16": ("deepspeed", 2),
        "zero3_bf16": ("deepspeed", 3),
    }
    ours = deepspeed_engine.deepspeed_config

    def defaults(*args, **kwargs) -> dict:  # noqa: ANN002, ANN003
        """Ours without the fp32 reduction keys: DeepSpeed's bf16 defaults."""
        config = ours(*args, **kwargs)
        config.pop("communication_data_type", None)
        config.pop("data_types", None)
        return config

    out = {}
    for case, (backend, stage) in cases.items():
        deepspeed_engine.deepspeed_config = defaults if case.endswith("_bf16") else ours
        model = load_causal_lm(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        model.gradient_checkpointing_enable({"use_reentrant": False})
        lcfg = LearnerConfig(backend=backend, zero_stage=stage)
        engine = build_engine(model, lcfg, optim, torch.device("cpu"), torch.bfloat16)
        engine.module.train()
        for k in range(MICRO_BATCHES):
            mb = batch.select(mine[k * ROWS : (k + 1) * ROWS])
            logp, _ = policy_logprobs(engine.module, mb)
            loss = aggregate_loss(sft_loss_mat(logp), mb.response_mask, "token-mean", den)
            engine.backward(loss * engine.grad_factor)
        grads = zero2_grads_at_step(engine) if stage == 2 else full_grads(engine)
        norm = engine.step()
        masters = {n: t.cpu() for n, t in engine.named_full_params()}
        if rank == 0:
            out[case] = {"grads": grads, "norm": norm, "masters": masters}
    dist.destroy_process_group()
    return out


def _rel_err(got: dict, want: dict) -> float:
    """The largest |got - want| of a tensor, relative to that tensor's largest |want|."""
    return max(
        float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)) for k in want
    )


@pytest.fixture(scope="module")
def results(tiny_model_dir, tmp_path_factory) -> dict:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a released bf16 checkpoint: every weight bf16-representable
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    path = tmp_path_factory.mktemp("bf16-weights")
    model.save_pretrained(path)
    return run_ranks(f"{__name__}:steps", model_dir=str(path))[0]


def test_deepspeed_config_reduces_in_fp32_and_clips_only_when_asked():
    from gad_ray.config.schema import LearnerConfig, OptimConfig
    from gad_ray.learner.deepspeed_engine import deepspeed_config

    lcfg, cpu = LearnerConfig(backend="deepspeed", zero_stage=3), torch.device("cpu")
    bf16 = deepspeed_config(lcfg, OptimConfig(grad_clip=None), cpu, torch.bfloat16)
    assert bf16["communication_data_type"] == "fp32"
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert bf16["gradient_clipping"] == 0.0  # off: DeepSpeed's own default clips at 1.0
    fp32 = deepspeed_config(lcfg, OptimConfig(grad_clip=0.2), cpu, torch.float32)
    assert "communication_data_type" not in fp32 and fp32["gradient_clipping"] == 0.2
    frozen = deepspeed_config(lcfg, None, cpu, torch.bfloat16)  # a forward-only reference
    assert "communication_data_type" not in frozen and "gradient_clipping" not in frozen


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_accumulated_step_equals_fsdp2_with_fp32_reduction(results, stage):
    want, new, old = results["fsdp"], results[f"zero{stage}"], results[f"zero{stage}_bf16"]
    err_new, err_old = _rel_err(new["grads"], want["grads"]), _rel_err(old["grads"], want["grads"])
    norm = _norm(want["grads"])  # of the reduced gradient, in fp64
    print(
        f"ZeRO-{stage} vs FSDP2, reduced gradient's relative error: fp32 reduction "
        f"{err_new:.2e}, DeepSpeed's bf16 defaults {err_old:.2e}; pre-clip norm (fp64 of the "
        f"gradient {norm:.9g}): fp32 {new['norm']:.9g}, bf16 defaults {old['norm']:.9g}, "
        f"FSDP2 {want['norm']:.9g}"
    )
    assert err_new <= GRAD_TOL
    assert err_old > 2**-12 > 100 * GRAD_TOL  # bf16 reduction: off by bf16 rounding
    assert new["norm"] == pytest.approx(norm, rel=GRAD_TOL)
    assert abs(old["norm"] - norm) > abs(new["norm"] - norm)
    assert want["norm"] == pytest.approx(norm, rel=10 * GRAD_TOL)  # FSDP2's own fp32 norm
    # the step itself (no clipping): the same fp32 masters, up to one ulp
    for name, t in want["masters"].items():
        torch.testing.assert_close(new["masters"][name], t, rtol=2**-23, atol=0, msg=name)
