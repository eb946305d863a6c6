"""The memory plan: every shipped preset fits its declared cluster, hand-computed figures for a
7B and a 0.5B model, the knobs named when a GPU runs out, and ``gad-train plan_only=true``."""

import subprocess
import sys
from pathlib import Path

import pytest
import ray

from gad_ray.config.schema import ConfigError
from gad_ray.driver.driver import Driver
from gad_ray.hydra_app import CONF_DIR, compose
from gad_ray.plan import check_fits, layout, make_plan
from gad_ray.plan.report import format_plan, place_on_ray

GiB = 2**30
BIN = Path(sys.executable).parent
PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _totals(plan, gpu: int = 0) -> dict[str, float]:
    g = plan.gpus[gpu]
    return {phase: g.total(phase) for phase in plan.phases}


@pytest.mark.parametrize("name", PRESETS)
def test_every_experiment_preset_validates_and_plans_on_its_declared_cluster(name, no_ray):
    cfg = compose([f"experiment={name}"])
    plan = make_plan(cfg)
    assert plan.problems == []
    check_fits(cfg)
    c = cfg.cluster
    if c.gpus_per_node == 0:
        assert "CPU-only" in format_plan(plan) and plan.gpus == [] and plan.hosts == []
        return
    assert len(plan.gpus) == c.num_nodes * c.gpus_per_node
    assert all(g.actors for g in plan.gpus)  # the presets use every GPU they declare
    assert max(g.total(p) for g in plan.gpus for p in plan.phases) <= c.gpu_memory_gib * GiB
    assert not ray.is_initialized()
    # the run's own placement group on a private Ray with the cluster's logical GPUs
    assert "placed on" in place_on_ray(cfg)
    assert not ray.is_initialized()


# Qwen2.5-7B-Instruct: hidden 3584, 28 layers, 28 query heads and 4 KV heads of 128, MLP 18944,
# vocabulary 152064, untied LM head, biases on q, k, v
H, LAYERS, MLP, VOCAB, KV, HEADS = 3584, 28, 18944, 152064, 4 * 128, 28
LAYER = (H * H + H) + 2 * (H * KV + KV) + H * H + 3 * H * MLP + 2 * H  # q k v o, MLP, 2 norms
ROOT, ROOT_D = 2 * VOCAB * H + H, VOCAB * H + 2 * H  # D: no LM head; final norm + Linear(h, 1)
P, P_D = LAYERS * LAYER + ROOT, LAYERS * LAYER + ROOT_D
PROC = 1.5 * GiB


def test_qwen25_7b_preset_matches_a_hand_computation():
    plan = make_plan(compose(["experiment=qwen2.5-7b_gpt5chat"]))
    assert P == 7_615_616_512
    # the worst micro batch: 12288 computed tokens as rows of the longest sequence (2048 +
    # 1536), the LM head on every position, bf16, gradient checkpointing, 8 ranks
    n, t, longest = 8, 12288, 3584
    checkpointed = LAYERS * 2 * H * t + 2 * 2 * 128 * t  # layer inputs + rotary cos, sin
    mask = t * longest  # bool [b, 1, t, t], b = t / longest
    # G's GRPO step peaks in its loss forward, at the entropy metric's last chunk: the logits,
    # their flattened copy, the fp32 log-softmax chunks kept for the backward, 3 fp32 chunks
    g_update = (
        (4 + 8 + 2) * P / n  # fp32 masters, Adam m and v, bf16 KL reference
        + 4 * P / n  # fp32 gradients
        + 2 * ROOT * 2  # the policy's and the reference's gathered root units
        + checkpointed
        + (4 + 2 * 2) * H * t  # the final norm's fp32 input, normalised input and output
        + mask
        + (2 + 2 + 4) * t * VOCAB
        + 12 * 1024 * VOCAB
        + 3 * PROC  # vLLM asleep, G, D processes; D offloaded (learner.offload_idle)
    )
    # D's BT step peaks in the backward of its last layer
    one_layer = (2 * (4 + 4) * H + 2 * 5 * H + 8 * MLP) * t + 4 * HEADS * t + 2 * 2 * mask
    d_update = (
        (12 + 4) * P_D / n
        + 2 * ROOT_D
        + checkpointed
        + (4 + 2) * H * t  # D's final norm output is not kept (only its last rows are used)
        + mask
        + one_layer
        + 2 * t * (2 * MLP + 2 * H)  # its gradients in flight
        + 3 * 2 * LAYER  # the layer, the prefetched one, FSDP2's all-gather buffer
        + (2 + 4) * LAYER  # its unsharded gradients, the fp32 reduce-scatter buffer
        + 3 * PROC
    )
    generate = 0.7 * 80 * GiB + 2 * PROC  # vLLM awake; both learners offloaded
    want = {"generate": generate, "D update": d_update, "G update": g_update}
    for gpu in range(8):
        assert _totals(plan, gpu) == pytest.approx(want, rel=1e-12)
        assert plan.gpus[gpu].moments == {"D update": "backward", "G update": "loss forward"}
    assert [round(want[k] / GiB, 2) for k in plan.phases] == [59.0, 27.88, 42.85]


def test_qwen25_05b_without_offload_matches_a_hand_computation():
    cfg = compose(
        [
            "experiment=qwen2.5-1.5b_gpt5chat",  # one GPU, colocated
            "model=qwen2.5-0.5b",
            "learner.offload_idle=false",
            "learner.max_tokens_per_micro_batch=8192",
        ]
    )
    plan = make_plan(cfg)
    # Qwen2.5-0.5B-Instruct: hidden 896, 24 layers, 14 query heads and 2 KV heads of 64,
    # MLP 4864, vocabulary 151936, tied embeddings.
    h, n_layers, mlp, vocab, kv = 896, 24, 4864, 151936, 2 * 64
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp + 2 * h
    root = vocab * h + h  # tied: the LM head is the embedding
    p = n_layers * layer + root
    assert p == 494_032_768
    p_d = n_layers * layer + vocab * h + 2 * h
    t, longest = 8192, 3584
    g_resident = 12 * p + 2 * p  # one rank: master + Adam, bf16 reference
    d_resident = 12 * p_d
    g_update = g_resident + 4 * p + 2 * root * 2 + n_layers * 2 * h * t + 2 * 2 * 64 * t
    g_update += 8 * h * t + t * longest + 8 * t * vocab + 12 * 1024 * vocab
    g_update += d_resident + 3 * PROC
    # D's step peaks in AdamW's foreach step: a fp32 temporary per parameter
    d_update = d_resident + 4 * p_d + 4 * p_d + g_resident + 3 * PROC
    generate = 0.7 * 80 * GiB + g_resident + d_resident + 2 * PROC
    want = {"generate": generate, "D update": d_update, "G update": g_update}
    assert _totals(plan) == pytest.approx(want, rel=1e-12)
    assert plan.gpus[0].moments == {"D update": "optimizer step", "G update": "loss forward"}
    assert [round(want[k] / GiB, 2) for k in plan.phases] == [70.96, 20.14, 30.23]
    assert plan.problems == []


def test_a_gpu_out_of_memory_names_the_knobs_and_stops_the_driver(no_ray):
    cfg = compose(["experiment=qwen2.5-7b_gpt5chat", "learner.offload_idle=false"])
    plan = make_plan(cfg)
    assert len(plan.problems) == 1
    msg = plan.problems[0]
    assert msg.startswith("GPUs 0-7 generate needs 81.3 GiB > 80.0 GiB (cluster.gpu_memory_gib)")
    assert "set learner.offload_idle=true (-> 59.0 GiB)" in msg
    with pytest.raises(ConfigError, match="learner.offload_idle=true"):
        check_fits(cfg)
    # the real run: the check comes before any actor, Ray or run directory
    with pytest.raises(ConfigError, match="does not fit its GPUs"):
        Driver(
            cfg.model_copy(
                update={"trainer": cfg.trainer.model_copy(update={"run_dir": "/nonexistent/x"})}
            )
        )
    assert not ray.is_initialized() and not Path("/nonexistent/x").exists()
    # no sleep mode while colocated: vLLM keeps its share in the learner phases
    awake = make_plan(compose(["experiment=qwen2.5-7b_gpt5chat", "rollout.sleep_when_idle=false"]))
    assert any("G update" in p and "rollout.sleep_when_idle=true" in p for p in awake.problems)


def test_disaggregated_layout_and_the_kv_cache_check():
    cfg = compose(
        [
            "experiment=qwen2.5-7b_gpt5chat",
            "cluster=multi_node",
            "cluster.placement=disaggregated",
            "rollout.num_workers=4",
            "rollout.tensor_parallel_size=2",
            "learner.generator_ranks=4",
            "learner.discriminator_ranks=4",
            "algorithm.grpo.entropy_coef=0.001",  # the entropy in the loss keeps its logits graph
            "learner.max_tokens_per_micro_batch=20480",
        ]
    )
    gpus = layout(cfg)
    assert gpus["rollout"] == [(0, 1), (2, 3), (4, 5), (6, 7)]  # node 0: the tp=2 workers
    assert gpus["generator"] == [(8,), (9,), (10,), (11,)] and gpus["discriminator"][0] == (12,)
    plan = make_plan(cfg)
    assert plan.gpus[1].actors == ["vLLM worker 0 (tp shard 2/2)"]
    assert plan.gpus[15].actors == ["D rank 3"]
    # G's own GPUs: 18 B/param over 4 ranks leave no room for 20480-token logits once the
    # entropy bonus is in the loss (its graph keeps 8 B per logit more)
    (problem,) = plan.problems
    assert problem.startswith("GPUs 8-11 G update needs 90.1 GiB > 80.0 GiB")
    assert "set learner.max_tokens_per_micro_batch=10240 (-> 64.6 GiB)" in problem
    assert "set learner.optimizer_offload=true (-> 68.8 GiB)" in problem
    small = compose(["experiment=qwen2.5-7b_gpt5chat", "rollout.gpu_memory_utilization=0.2"])
    (problem,) = make_plan(small).problems
    assert problem.startswith("rollout: a worker's KV cache holds 0 tokens")
    assert "raise rollout.gpu_memory_utilization (now 0.2)" in problem


def _gad_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "gad-train"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_gad_train_plan_only_prints_the_plan_and_exits_by_the_verdict(tmp_path):
    out = _gad_train("experiment=qwen2.5-7b_gpt5chat", "plan_only=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "0    0     vLLM worker 0, G rank 0, D rank 0" in out.stdout
    assert "GPUs 0-7, peak GiB per phase:" in out.stdout
    assert "Fits: the peak is 59.0 GiB (generate on GPUs 0-7) of 80.0 GiB" in out.stdout
    out = _gad_train(
        "experiment=qwen2.5-7b_gpt5chat", "plan_only=true", "learner.offload_idle=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2
    assert "generate needs 81.3 GiB" in out.stderr and "learner.offload_idle=true" in out.stderr
