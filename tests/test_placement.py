"""Resource pools per role on a real Ray with logical GPUs (no CUDA needed to place actors)."""

import pytest
import ray

from gad_ray import recipes
from gad_ray.config.schema import ConfigError
from gad_ray.driver.roles import Roles
from gad_ray.hydra_app import compose
from gad_ray.placement import plan_placement, release

GAD = ("rollout", "generator", "discriminator")


@ray.remote
class Probe:
    def gpus(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


@pytest.fixture(scope="module")
def gpu_ray(ray_cluster):
    """A Ray of its own with 4 logical GPUs (no CUDA needed to place actors): the shared one
    has none."""
    with ray_cluster.own() as start:
        start(num_cpus=16, num_gpus=4)
        yield


def _cfg(*extra):
    return compose(
        [
            "model=tiny",
            "cluster.gpus_per_node=4",
            "data.max_prompt_length=64",
            "data.max_response_length=16",
            *extra,
        ]
    )


def _gpus_by_role(placements):
    out = {}
    for role, p in placements.items():
        actors = [Probe.options(**p.options(i)).remote() for i in range(len(p.bundles))]
        out[role] = [tuple(g) for g in ray.get([a.gpus.remote() for a in actors])]
        for a in actors:
            ray.kill(a)
    return out


def test_disaggregated_gives_each_role_its_own_gpus(gpu_ray):
    cfg = _cfg(
        "cluster.placement=disaggregated",
        "rollout.num_workers=1",
        "rollout.tensor_parallel_size=2",
        "learner.generator_ranks=1",
        "learner.discriminator_ranks=1",
    )
    placements = plan_placement(cfg, GAD)
    try:
        gpus = _gpus_by_role(placements)
    finally:
        release(placements)
    assert [len(g) for g in gpus["rollout"]] == [2]  # one worker, tensor parallel 2
    used = [g for role in gpus.values() for actor in role for g in actor]
    assert len(used) == len(set(used)) == 4


def test_colocated_puts_rank_i_of_every_role_on_gpu_i(gpu_ray):
    cfg = _cfg(
        "cluster.placement=colocated",
        "rollout.num_workers=4",
        "learner.generator_ranks=4",
        "learner.discriminator_ranks=4",
        "learner.micro_batch_size=1",
    )
    placements = plan_placement(cfg, GAD)
    try:
        gpus = _gpus_by_role(placements)
    finally:
        release(placements)
    assert gpus["rollout"] == gpus["generator"] == gpus["discriminator"]
    assert len({g for (g,) in gpus["generator"]}) == 4


def test_too_few_gpus_is_a_config_error_naming_the_keys(gpu_ray):
    cfg = _cfg(
        "cluster.placement=disaggregated",
        "rollout.num_workers=2",
        "rollout.tensor_parallel_size=2",
        "learner.generator_ranks=2",
        "learner.discriminator_ranks=1",
        "learner.micro_batch_size=1",
    )
    with pytest.raises(ConfigError, match=r"needs 7 GPUs .* cluster.gpus_per_node = 4"):
        plan_placement(cfg, GAD)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2"):
        plan_placement(_cfg("cluster.placement=colocated", "rollout.tensor_parallel_size=2"), GAD)


def test_cpu_cluster_needs_no_pool():
    placements = plan_placement(compose(["model=tiny"]), GAD)
    assert all(p.pg is None and p.num_gpus == 0 for p in placements.values())


PROXY = [
    "algorithm=proxy_kd",
    "learner.generator_ranks=2",
    "algorithm.proxy_kd.ranks=2",
    "rollout.num_workers=2",
    "learner.micro_batch_size=1",
]


def test_proxy_kd_roles_share_the_colocated_pool_stage_by_stage(gpu_ray):
    """Every Proxy-KD role is placed by the same factory: colocated, actor i of the proxy, its
    rollout, the frozen proxy, the student and its rollout all land on GPU i."""
    cfg = _cfg("cluster.placement=colocated", *PROXY)
    role_sets = recipes.build(cfg).role_sets()
    roles = Roles(cfg, "unused", {}, role_sets)
    try:
        by_stage = [_gpus_by_role({r: roles.places[r] for r in rs}) for rs in role_sets]
    finally:
        roles.shutdown()
    for gpus in by_stage:  # each stage's roles fit their fractions of the same 2 GPUs
        assert len({tuple(g) for g in gpus.values()}) == 1
    assert by_stage[0]["proxy"] == by_stage[-1]["generator"] == by_stage[-1]["proxy_frozen"]


def test_proxy_kd_disaggregated_sets_are_checked_before_any_actor(gpu_ray):
    cfg = _cfg("cluster.placement=disaggregated", *PROXY, "rollout.tensor_parallel_size=2")
    # alignment: proxy 2 + its rollout 2 x 2 = 6 GPUs > 4
    with pytest.raises(ConfigError, match=r"needs 6 GPUs \(proxy: 2 x 1 GPU, proxy_rollout"):
        Roles(cfg, "unused", {}, recipes.build(cfg).role_sets())
