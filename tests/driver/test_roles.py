"""Roles on a CPU-only cluster: each actor's share of the cores, given back on shutdown. On a GPU
cluster (logical GPUs, an injected memory probe): shutdown waits for the GPU memory the roles
held, or fails naming the GPUs still held."""

import pytest
import ray

from gad_ray.driver.roles import GpuMemoryHeld, Roles
from gad_ray.models.loading import resolve_model_path
from tests.config_builder import make_config, tiny_run


@pytest.fixture
def four_cpus(own_ray):
    """A Ray of exactly 4 CPUs, all of which the roles below take (not the shared one)."""
    own_ray(num_cpus=4)


def test_shutdown_returns_once_the_cpus_are_free_so_new_roles_get_full_shares(four_cpus, tmp_path):
    """G and D take 2 CPUs each (cluster.cpus_per_node=2), all 4 of the cluster. Roles built
    right after a shutdown (a restart, a resumed run in the same Ray session) must get the same
    shares: ray.kill returns before the processes exit, and fitting the new roles to the CPUs
    not yet released gave shares of ~1e-5 CPU, below Ray's unit (a ValueError)."""

    cfg = make_config(*tiny_run(tmp_path / "run"))
    sets = [("generator", "discriminator")]
    student = resolve_model_path(cfg.model.student.path)
    for _ in range(2):
        roles = Roles(cfg, student, {}, sets)
        assert roles.cpu_scale == 1.0
        roles.ensure(sets[0])
        assert ray.get(roles["discriminator"].workers[0].__ray_ready__.remote())
        assert ray.available_resources().get("CPU", 0.0) == 0.0
        roles.shutdown()
        assert ray.available_resources()["CPU"] == 4.0


# -- a GPU cluster: the restart waits for the GPU memory of the stopped roles ----------------

GAD = ("rollout", "generator", "discriminator")
GIB = 1 << 30
BEFORE = {"0": GIB // 2, "1": GIB // 2, "2": GIB // 2, "3": 0}  # in use before the roles


class Probe:
    """The injected GPU-memory probe of the one node: ``used`` as the test sets it; after
    :meth:`free_after` polls, back to what was in use before the roles (the processes exit)."""

    def __init__(self) -> None:
        self.used, self.polls, self.left = dict(BEFORE), [], None

    def free_after(self, polls: int) -> None:
        self.left = polls

    def __call__(self, node_id: str) -> dict[str, int]:
        self.polls.append(node_id)
        if self.left is not None:
            self.left -= 1
            if self.left < 0:
                self.used = dict(BEFORE) | {"3": self.used["3"]}  # GPU 3: not ours
        return dict(self.used)


@ray.remote(num_cpus=0)
class Placed:
    """Stands in for a role's actor where CUDA is needed to build one: placed the same way."""


class GroupOfPlaced:
    def __init__(self, place, n: int) -> None:
        self.workers = [Placed.options(**place.options(i)).remote() for i in range(n)]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)


class GpuRoles(Roles):
    def build(self, name, alive=()):
        return GroupOfPlaced(self.places[name], 2)


@pytest.fixture
def four_gpus(own_ray):
    """A Ray of its own with 4 logical GPUs (no CUDA): the shared one has none."""
    own_ray(num_cpus=16, num_gpus=4)
    return ray.get_runtime_context().get_node_id()


def gpu_roles(tmp_path, probe, timeout_s=30.0) -> GpuRoles:
    cfg = make_config(
        *tiny_run(
            tmp_path / "run",
            "cluster.gpus_per_node=4",
            "cluster.placement=colocated",
            "rollout.num_workers=2",
            "learner.generator_ranks=2",
            "learner.discriminator_ranks=2",
        )
    )
    return GpuRoles(cfg, "unused", {}, [GAD], gpu_probe=probe, gpu_free_timeout_s=timeout_s)


def test_restart_waits_until_the_stopped_roles_gpu_memory_is_free(four_gpus, tmp_path):
    """Colocated roles on GPUs 0 and 1: shutdown returns only once the probe reads their memory
    back at what it was before the roles (3 polls after the kill still read it held), whatever
    GPU 3, which no role held, has in use."""
    probe = Probe()
    roles = gpu_roles(tmp_path, probe)
    assert roles.gpus_before == {four_gpus: BEFORE}  # read before any actor
    roles.ensure(GAD)
    assert roles.held == {four_gpus: {"0", "1"}}  # actor i of every role on GPU i
    probe.used |= {"0": 40 * GIB, "1": 40 * GIB, "3": 70 * GIB}  # 3: another job's
    probe.free_after(3)
    polls = len(probe.polls)
    roles.shutdown()
    assert len(probe.polls) - polls == 4 and probe.used["0"] == BEFORE["0"]
    assert ray.available_resources().get("GPU") == 4.0  # the pool is released
    roles.shutdown()  # nothing held any more: no wait
    assert len(probe.polls) - polls == 4


@pytest.mark.parametrize("strict", [True, False])
def test_restart_fails_naming_the_gpus_whose_memory_stays_held(strict, four_gpus, tmp_path):
    """Before a restart's new roles (strict): an error naming each GPU still held, its node,
    its memory now and before the roles; at the end of a run (not strict) the same as a
    warning, so it cannot mask the run's own outcome."""
    probe = Probe()
    roles = gpu_roles(tmp_path, probe, timeout_s=1.0)
    roles.ensure(GAD)
    probe.used |= {"0": GIB // 2, "1": 35 * GIB}  # GPU 1 stays held (a process that hangs)
    if strict:
        with pytest.raises(GpuMemoryHeld) as err:
            roles.shutdown()
        msg = str(err.value)
    else:
        with pytest.warns(UserWarning) as warned:
            roles.shutdown(strict=False)
        msg = str(warned[0].message)
    ip = ray.util.get_node_ip_address()
    assert f"node {ip} GPU 1: 35.0 GiB in use, 0.5 GiB before the roles started" in msg, msg
    assert "GPU 0" not in msg and "1 s after" in msg
    assert roles.groups == {} and roles.held == {}  # torn down; a second shutdown does not wait
    polls = len(probe.polls)
    roles.shutdown()
    assert len(probe.polls) == polls
