"""LoRA learners (peft) on real Ray + gloo, FSDP2 and DeepSpeed ZeRO-2/3: G's SFT and GRPO steps
and D's BT step equal a plain peft model trained in one process; the shared-base group equals
separate LoRA groups; checkpoints hold only the adapters (+ D's head) and a base pointer; the
HF export merges or saves the adapter."""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import AutoModel, AutoModelForCausalLM

from gad_ray.algorithms import bt_loss
from gad_ray.discriminator.learner import DiscriminatorGroup
from gad_ray.discriminator.model import discriminator_config, new_head
from gad_ray.discriminator.shared import SharedGroup
from gad_ray.learner import GeneratorGroup
from gad_ray.learner.lora import (
    DISCRIMINATOR,
    GENERATOR,
    is_adapter_param,
    peft_key,
    relative_key,
)
from gad_ray.models.adapter_files import BASE_POINTER
from tests.config_builder import learner_config, make_config
from tests.learner.conftest import (
    ReferenceTrainer,
    assert_metrics_close,
    make_token_batch,
)

T = 0.8  # the temperature the GRPO batches are taken to be sampled at

RANK, ALPHA = 4, 8.0
# (backend, zero_stage, ranks): FSDP2 and ZeRO-2/3, one and two ranks
CASES = [("fsdp", 3, 1), ("fsdp", 3, 2), ("deepspeed", 2, 2), ("deepspeed", 3, 1)]
PAIRS = torch.tensor([0, 0, 1, 1])


def lora_cfg(model_dir, shared: bool = False, checkpointing: bool = False, **learner):
    lora = {"rank": RANK, "alpha": ALPHA}
    return make_config(
        base=learner_config(model_dir, **learner),
        model__student__lora=lora,
        model__student__gradient_checkpointing=checkpointing,
        model__discriminator__lora=lora,
        model__discriminator__gradient_checkpointing=checkpointing,
        algorithm__discriminator_optim__lr=1e-3,
        algorithm__discriminator_optim__eps=1e-6,
        algorithm__discriminator_optim__grad_clip=1.0,
        learner__shared_base=shared,
    )


def adapter(params: dict, name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights of a learner's full parameters, by their place in the stack."""
    return {
        relative_key(peft_key(k, name)): v for k, v in params.items() if is_adapter_param(k, name)
    }


def peft_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {
        relative_key(k.replace(".default.", ".")): p.detach().clone()
        for k, p in model.named_parameters()
        if ".lora_" in k
    }


def peft_lm(model_dir, init: dict[str, torch.Tensor]) -> PeftModel:
    """The student with a plain peft adapter holding the learner's initial weights."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    set_peft_model_state_dict(model, {f"base_model.model.model.{k}": v for k, v in init.items()})
    return model


def g_steps(group, batch, adv, noise) -> dict:
    out = {"init": group.full_params(), "sft": group.train_sft(batch)}
    out["old"] = group.compute_logprobs(batch, 0.8) + noise
    out["grpo"] = group.train_grpo(batch, adv, out["old"], temperature=T)
    out["grpo_on_policy"] = group.train_grpo(batch, adv, temperature=T)
    out["params"] = group.full_params()
    return out


def d_steps(group) -> dict:
    teacher, student = make_token_batch(seed=5, n=2), make_token_batch(seed=6, n=4)
    out = {"init": group.full_params(), "bt": group.train_bt(teacher, student, PAIRS)}
    out["bt2"] = group.train_bt(teacher, student, PAIRS)
    out["params"] = group.full_params()
    return out


@pytest.fixture(scope="module")
def inputs():
    batch = make_token_batch(seed=0, n=6)
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(len(batch), generator=gen)
    noise = 0.3 * torch.randn(batch.input_ids.shape, generator=gen) * batch.response_mask
    return batch, adv, noise


@pytest.fixture(scope="module")
def reference_g(tiny_model_dir, inputs, ray_session):
    """G's steps with plain peft in one process, from the learner's initial adapter."""
    batch, adv, noise = inputs
    cfg = lora_cfg(tiny_model_dir)
    group = GeneratorGroup(cfg)
    try:
        init = group.full_params()
        ref = ReferenceTrainer(tiny_model_dir, cfg)
        a = adapter(init, GENERATOR)
        ref.model, ref.ref = peft_lm(tiny_model_dir, a), peft_lm(tiny_model_dir, a)
        ref.ref.requires_grad_(False)
        o = cfg.algorithm.generator_optim
        trained = [p for p in ref.model.parameters() if p.requires_grad]
        ref.opt = torch.optim.AdamW(trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=0.01)
        out = {"sft": ref.sft(batch)}
        group.train_sft(batch)  # the old log-probs of g_steps: after the SFT step, + noise
        old = group.compute_logprobs(batch, 0.8) + noise
        tokens_adv = adv[:, None] * batch.response_mask
        out["grpo"] = ref.grpo(batch, tokens_adv, old, T)
        out["grpo_on_policy"] = ref.grpo(batch, tokens_adv, None, T)
        out["params"] = peft_weights(ref.model)
        return out
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def reference_d(tiny_model_dir, ray_session):
    """D's two BT steps with a plain peft backbone + head in one process."""
    cfg = lora_cfg(tiny_model_dir)
    group = DiscriminatorGroup(cfg)
    try:
        init = group.full_params()
    finally:
        group.shutdown()
    backbone = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        backbone, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")
    )
    set_peft_model_state_dict(
        model, {f"base_model.model.{k}": v for k, v in adapter(init, DISCRIMINATOR).items()}
    )
    head = new_head(discriminator_config(backbone.config), cfg.seed)
    torch.testing.assert_close(head.weight.detach(), init["score.weight"])
    o = cfg.algorithm.discriminator_optim
    trained = [p for p in model.parameters() if p.requires_grad] + [head.weight]
    opt = torch.optim.AdamW(trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    teacher, student = make_token_batch(seed=5, n=2), make_token_batch(seed=6, n=4)

    def scores(b):
        hidden = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        last = b.attention_mask.sum(1) - 1  # right-padded rows end with their response
        return head(hidden[torch.arange(len(b)), last]).squeeze(-1)

    out = {}
    for step in ("bt", "bt2"):
        loss, metrics = bt_loss(scores(teacher)[PAIRS], scores(student), "mean")
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(trained, o.grad_clip))
        opt.step()
        opt.zero_grad()
        out[step] = {**metrics, "grad_norm": norm}
    out["params"] = peft_weights(model) | {"score.weight": head.weight.detach().clone()}
    return out


def assert_weights_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert set(got) == set(want) and got, set(got) ^ set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("backend,zero,ranks", CASES)
def test_lora_g_and_d_steps_equal_plain_peft(
    backend, zero, ranks, tiny_model_dir, inputs, reference_g, reference_d, ray_session
):
    learner = {"backend": backend, "zero_stage": zero, "max_tokens_per_micro_batch": 24}
    cfg = lora_cfg(tiny_model_dir, generator_ranks=ranks, discriminator_ranks=ranks, **learner)
    g = GeneratorGroup(cfg)
    try:
        got = g_steps(g, *inputs)
    finally:
        g.shutdown()
    for step in ("sft", "grpo", "grpo_on_policy"):
        assert_metrics_close(got[step], reference_g[step])
    assert got["grpo"]["pg_clipfrac"] > 0 and got["grpo"]["kl"] > 0  # not vacuous
    assert_weights_close(adapter(got["params"], GENERATOR), reference_g["params"])
    # the base is frozen: only adapter weights moved
    for k, v in got["init"].items():
        if ".lora_" not in k:
            assert torch.equal(v, got["params"][k]), k
    assert all(v.dtype == torch.float32 for v in adapter(got["params"], GENERATOR).values())

    d = DiscriminatorGroup(cfg)
    try:
        got = d_steps(d)
    finally:
        d.shutdown()
    for step in ("bt", "bt2"):
        assert_metrics_close(got[step], reference_d[step])
    want = reference_d["params"]
    assert_weights_close(
        adapter(got["params"], DISCRIMINATOR) | {"score.weight": got["params"]["score.weight"]},
        want,
    )


def test_shared_base_group_steps_equal_separate_lora_groups(tiny_model_dir, inputs, ray_session):
    """One group, one base, gradient checkpointing ON (as in the 7B LoRA one-GPU preset): G's
    SFT, D's BT, G's GRPO (after the reference reset), D's BT again, D's scores and both adapters
    equal those of a separate G and a separate D group without checkpointing. From D's first
    step on both adapters are non-zero: a layer recomputed with the other role's adapter would
    give other gradients (D's second BT step)."""
    batch, adv, noise = inputs
    teacher, student = make_token_batch(seed=5, n=2), make_token_batch(seed=6, n=4)

    def run(g, d) -> dict:
        out = {"sft": g.train_sft(batch), "bt": d.train_bt(teacher, student, PAIRS)}
        g.reset_reference()
        out["grpo"] = g.train_grpo(
            batch, adv, g.compute_logprobs(batch, 0.8) + noise, temperature=T
        )
        out["grpo2"] = g.train_grpo(batch, adv, temperature=T)
        out["bt2"] = d.train_bt(teacher, student, PAIRS)
        out["scores"] = d.score(student)
        out["g"], out["d"] = g.full_params(), d.full_params()
        return out

    learner = {"generator_ranks": 2, "discriminator_ranks": 2, "max_tokens_per_micro_batch": 24}
    shared = SharedGroup(lora_cfg(tiny_model_dir, shared=True, checkpointing=True, **learner))
    try:
        got = run(shared, shared)
    finally:
        shared.shutdown()
    cfg = lora_cfg(tiny_model_dir, **learner)
    g, d = GeneratorGroup(cfg), DiscriminatorGroup(cfg)
    try:
        want = run(g, d)
    finally:
        g.shutdown()
        d.shutdown()
    for step in ("sft", "bt", "grpo", "grpo2", "bt2"):
        assert_metrics_close(got[step], want[step])
    assert got["grpo"]["kl"] == pytest.approx(0, abs=1e-7)  # the reference reset to G
    assert got["grpo2"]["kl"] > 0
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-5, atol=1e-5)
    assert_weights_close(adapter(got["g"], GENERATOR), adapter(want["g"], GENERATOR))
    assert_weights_close(adapter(got["d"], DISCRIMINATOR), adapter(want["d"], DISCRIMINATOR))
    torch.testing.assert_close(got["d"]["score.weight"], want["d"]["score.weight"])
    # one base in the shared group: the LM's weights, no second backbone for D
    base = [k for k in got["g"] if ".lora_" not in k and k != "score.weight"]
    assert len(base) == len([k for k in want["g"] if ".lora_" not in k])


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_checkpoint_holds_only_adapters_and_round_trips(
    backend, small_model_dir, ray_session, tmp_path
):
    cfg = lora_cfg(small_model_dir, backend=backend, generator_ranks=2)
    g = GeneratorGroup(cfg)
    batch = make_token_batch(seed=3, n=6)
    try:
        g.train_sft(batch)
        g.reset_reference()
        g.train_grpo(batch, torch.randn(6), temperature=T)
        saved = g.full_params()
        ckpt = tmp_path / "ckpt"
        g.save_checkpoint(str(ckpt))
        want = g.train_grpo(
            batch, torch.ones(6), temperature=T
        )  # from the saved state (incl. Adam, reference)
        g.train_sft(make_token_batch(seed=4, n=6))
        g.load_checkpoint(str(ckpt))
        for k, v in g.full_params().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
        assert_metrics_close(g.train_grpo(batch, torch.ones(6), temperature=T), want, tol=1e-6)
    finally:
        g.shutdown()
    pointer = json.loads((ckpt / BASE_POINTER).read_text())
    assert (
        pointer["base"] == str(small_model_dir) and pointer["adapters"][GENERATOR]["rank"] == RANK
    )
    # G's adapter, its Adam state and the reference adapter, not the base: a small fraction of
    # the model's weights (a full fine-tuning checkpoint holds ~4x the model)
    model_bytes = 4 * sum(v.numel() for k, v in saved.items() if ".lora_" not in k)
    assert dir_bytes(ckpt) < 0.1 * model_bytes, (dir_bytes(ckpt), model_bytes)


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_export_merged_or_adapter_loads_with_hf_and_peft(
    export, tiny_model_dir, ray_session, tmp_path
):
    cfg = make_config(
        base=lora_cfg(tiny_model_dir),
        model__student__lora__export=export,
        model__discriminator__lora__export=export,
    )
    batch = make_token_batch(seed=3, n=6)
    g = GeneratorGroup(cfg)
    try:
        g.train_sft(batch)
        g.train_sft(batch)
        want = g.compute_logprobs(batch)
        g.save_pretrained(str(tmp_path / "g"))
    finally:
        g.shutdown()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if export == "merged":  # a plain HF model
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32)
    else:  # peft's adapter directory over the base it points to
        pointer = json.loads((tmp_path / "g" / BASE_POINTER).read_text())
        assert pointer["base"] == str(tiny_model_dir)
        model = PeftModel.from_pretrained(base, tmp_path / "g")
        assert dir_bytes(tmp_path / "g") < 0.5 * dir_bytes(tiny_model_dir)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    got = torch.nn.functional.pad(logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0], (1, 0))
    torch.testing.assert_close(got * batch.response_mask, want, rtol=1e-4, atol=1e-4)

    d = DiscriminatorGroup(cfg)
    try:
        d.train_bt(make_token_batch(seed=5, n=2), make_token_batch(seed=6, n=4), PAIRS)
        scores = d.score(batch)
        d.save_pretrained(str(tmp_path / "d"))
    finally:
        d.shutdown()
    if export == "merged":
        from gad_ray.discriminator.model import DiscriminatorModel

        dm = DiscriminatorModel.from_pretrained(str(tmp_path / "d"))
        with torch.no_grad():
            got = dm(batch.input_ids, batch.attention_mask, batch.response_mask)
        torch.testing.assert_close(got, scores, rtol=1e-4, atol=1e-4)
    else:
        files = set(os.listdir(tmp_path / "d"))
        assert {
            "adapter_model.safetensors",
            "adapter_config.json",
            BASE_POINTER,
            "trained.safetensors",
        } <= files
