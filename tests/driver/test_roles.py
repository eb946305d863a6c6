"""Roles on a CPU-only cluster: each actor's share of the cores, given back on shutdown."""

import pytest
import ray

from gad_ray.driver.roles import Roles
from gad_ray.models.loading import resolve_model_path

from .conftest import tiny_overrides


@pytest.fixture
def four_cpus():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_shutdown_returns_once_the_cpus_are_free_so_new_roles_get_full_shares(four_cpus, tmp_path):
    """G and D take 2 CPUs each (cluster.cpus_per_node=2), all 4 of the cluster. Roles built
    right after a shutdown (a restart, a resumed run in the same Ray session) must get the same
    shares: ray.kill returns before the processes exit, and fitting the new roles to the CPUs
    not yet released gave shares of ~1e-5 CPU, below Ray's unit (a ValueError)."""
    from gad_ray.config.hydra_app import compose

    cfg = compose(tiny_overrides(tmp_path / "run"))
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
