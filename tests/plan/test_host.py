"""Host memory per node: pinned blocks rounded to powers of two, the 7B preset's node by hand,
one loading process per learner group, and a node too small stops the run naming the key."""

import math

import pytest

from gad_ray.config.schema import ConfigError
from gad_ray.hydra_app import compose
from gad_ray.plan import check_fits, make_plan
from gad_ray.plan.host import host_total, pinned

GiB, MiB = 2**30, 2**20
H, LAYERS, MLP, VOCAB, KV = 3584, 28, 18944, 152064, 512  # Qwen2.5-7B-Instruct
P = 7_615_616_512
P_D = P - VOCAB * H + H  # no LM head; the scalar head


def test_pinned_blocks_round_up_to_a_power_of_two():
    assert pinned(3) == 4 and pinned(MiB) == MiB and pinned(MiB + 1) == 2 * MiB
    assert pinned(0) == 0


def _shard_blocks(rows_cols: list[tuple[int, int]], ranks: int, nbytes: int) -> int:
    return sum(2 ** math.ceil(math.log2(math.ceil(r / ranks) * c * nbytes)) for r, c in rows_cols)


def test_qwen25_7b_preset_node_by_hand():
    plan = make_plan(compose(["experiment=qwen2.5-7b_gpt5chat"]))
    (node,) = plan.hosts
    # one rank's FSDP2 shards of every tensor (rows split over 8 ranks), fp32: q and o 8 MiB,
    # k and v 1 MiB, gate, up and down 64 MiB (33.9 MB each), embeddings and LM head 512 MiB
    layer = [(H, H), (KV, H), (KV, H), (H, H), (MLP, H), (MLP, H), (H, MLP)]
    layer += [(H, 1), (H, 1), (H, 1), (KV, 1), (KV, 1)]  # 2 norms, q k v biases
    g = _shard_blocks(layer * LAYERS + [(VOCAB, H), (VOCAB, H), (H, 1)], 8, 4)
    d = _shard_blocks(layer * LAYERS + [(VOCAB, H), (H, 1), (1, H)], 8, 4)
    assert g == (28 * 210 + 1024) * MiB + (28 * (3 * 2048 + 2 * 256) + 2048)

    def term(prefix: str) -> dict[str, float]:
        (key,) = [k for k in node if k.startswith(prefix)]
        return node[key]

    idle = "idle masters + Adam m + v (learner.offload_idle)"
    assert term(f"G {idle}")["training"] == 8 * 3 * g  # masters, m and v of 8 ranks
    assert term(f"D {idle}")["training"] == 8 * 3 * d
    assert term("G idle KL reference (2 B)")["training"] == 8 * _shard_blocks(
        layer * LAYERS + [(VOCAB, H), (VOCAB, H), (H, 1)], 8, 2
    )
    # the G group's loading process reads the fp32 masters and the bf16 reference, once
    assert term("G's loading process reads fp32 masters")["loading"] == 4 * P
    assert term("G's loading process reads the KL reference")["loading"] == 2 * P
    assert not any(k.startswith("D's loading") for k in node)  # D's 4 P_D is the smaller read
    # vLLM sleeping: 8 workers' bf16 weights, one pinned block per CUDA allocation
    assert 1.7 * 8 * 2 * P < term("vLLM sleeping weights")["training"] < 2 * 8 * 2 * P
    assert term("processes: 25 x 2 GiB") == {"loading": 50 * GiB, "training": 50 * GiB}
    assert round(host_total(node, "training") / GiB, 1) == 602.6
    assert round(host_total(node, "loading") / GiB, 1) == 92.6
    assert P_D < P


def test_a_node_without_the_host_memory_stops_the_run_naming_the_key():
    cfg = compose(["experiment=qwen2.5-7b_gpt5chat", "cluster.host_memory_gib=512"])
    (problem,) = make_plan(cfg).problems
    assert problem.startswith(
        "node 0 host memory (training) needs 602.6 GiB > 512.0 GiB (cluster.host_memory_gib)"
    )
    with pytest.raises(ConfigError, match="cluster.host_memory_gib"):
        check_fits(cfg)
    # without offloading the idle learners, their states stay on the GPUs, not in host memory
    lean = make_plan(cfg.model_copy(update={"learner": cfg.learner.model_copy(
        update={"offload_idle": False})}))  # fmt: skip
    assert not any("host memory" in p for p in lean.problems)


@pytest.mark.parametrize(
    "preset,gib",
    [
        ("qwen2.5-1.5b_gpt5chat", 128),
        ("qwen2.5-7b-lora_1gpu", 128),
        ("qwen2.5-7b_gpt5chat", 1024),
        ("qwen2.5-14b_gpt5chat", 1024),
    ],
)
def test_every_gpu_preset_fits_its_nodes_host_memory(preset, gib):
    plan = make_plan(compose([f"experiment={preset}"]))
    assert plan.cfg.cluster.host_memory_gib == gib
    assert len(plan.hosts) == plan.cfg.cluster.num_nodes
    for node in plan.hosts:
        assert 0 < max(host_total(node, p) for p in ("loading", "training")) <= gib * GiB
