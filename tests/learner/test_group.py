"""Learner groups: rendezvous over real gloo, fan-out, micro-batch plans, failures by rank."""

import os
import sys
import time

import pytest
import ray
import torch
import torch.distributed as dist

from gad_ray.learner import LearnerError, LearnerGroup, LearnerWorker

# the test workers below live in this test module: ship them to the actors by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EchoWorker(LearnerWorker):
    """A worker without a model: enough to check the group machinery."""

    def setup(self) -> None:
        self.ready = True

    def rank_sum(self) -> int:
        t = torch.tensor([self.rank + 1])
        dist.all_reduce(t)
        return int(t)

    def info(self) -> tuple[int, int, int]:
        return self.rank, dist.get_world_size(), torch.get_num_threads()

    def fail_on(self, rank: int) -> None:
        if self.rank == rank:
            raise ValueError(f"bad value on rank {rank}")

    def die_on(self, rank: int) -> None:
        if self.rank == rank:
            os._exit(1)


def _wait_all_cpus_free(timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir, lh):
    """One group for the whole module; the last test kills a rank of it."""
    g = LearnerGroup(EchoWorker, lh.learner_config(tiny_model_dir, micro_batch_size=2), 2, "probe")
    yield g
    g.shutdown()


def test_ranks_form_one_process_group(group):
    assert group.run_all("info") == [(0, 2, 1), (1, 2, 1)]
    assert group.run("rank_sum") == 3  # all-reduce over gloo: 1 + 2


def test_plan_gives_every_rank_the_same_number_of_micro_batches(group, lh):
    batch = lh.make_token_batch(n=5)
    plan = group.plan(batch)
    assert len(plan) == 2 and len(plan[0]) == len(plan[1]) == 2
    assert [] in plan[1]  # 3 + 2 rows at 2 per micro-batch: rank 1 is padded with an empty one
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(5))


def test_an_error_on_one_rank_names_role_and_rank(group):
    with pytest.raises(LearnerError, match=r"probe learner rank 1 failed: .*bad value on rank 1"):
        group.run("fail_on", 1)


def test_too_many_ranks_for_the_cluster_is_a_clear_error(group, tiny_model_dir, lh):
    with pytest.raises(LearnerError, match=r"probe learner: no room for 8 ranks"):
        LearnerGroup(EchoWorker, lh.learner_config(tiny_model_dir), 8, "probe", ready_timeout_s=2)


def test_a_dead_rank_names_role_and_rank_and_shutdown_frees_resources(group):
    held = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0)
    assert held >= 2  # the 2 ranks' CPUs are reserved
    with pytest.raises(LearnerError, match=r"probe learner rank 1 died"):
        group.run("die_on", 1)
    group.shutdown()
    assert group.workers == [] and group.pg is None
    assert _wait_all_cpus_free()
