"""Shared pytest fixtures: the tiny models and the one Ray cluster of a test process."""

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from gad_ray.models.tiny import build_tiny_model

# The one local Ray cluster of a pytest process, a superset of what every test asks for: the
# driver runs (cluster.cpus_per_node=2; their roles fit in 8 logical CPUs, and init_ray joins a
# running Ray), the learner, rollout and D groups (1-2 CPUs per actor). Actor logs stay in
# their files (tests read the driver's own output). Actors inherit the environment Ray starts
# with: a variable they need is set at import time of a conftest (e.g. tests/driver's teacher
# key), before the first test starts the cluster.
RAY_CLUSTER = {"num_cpus": 8, "include_dashboard": False, "log_to_driver": False}
RELEASE_TIMEOUT_S = 30.0  # for a module's actors to give their CPUs back (ray.kill is async)


class RayCluster:
    """Starts the shared cluster on first use and keeps it across modules (tests that use no
    Ray run beside it); stops it for a test or module with a Ray of its own (:meth:`own`) and
    for a test that needs no Ray running (``no_ray``)."""

    def __init__(self) -> None:
        self.node: str | None = None  # the node id of the running shared cluster
        self.starts = 0

    def up(self) -> None:
        if ray.is_initialized() and ray.get_runtime_context().get_node_id() == self.node:
            return
        if ray.is_initialized():  # someone else's (a test that started Ray and left it)
            ray.shutdown()
        ray.init(**RAY_CLUSTER)
        self.node = ray.get_runtime_context().get_node_id()
        self.starts += 1

    def down(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        self.node = None

    @contextlib.contextmanager
    def own(self) -> Iterator[Callable[..., Any]]:
        """Stops the shared cluster and gives ``start(**init)`` (``ray.init`` without the
        dashboard) for a Ray of the caller's own, shut down on exit."""
        self.down()
        try:
            yield lambda **init: ray.init(**{"include_dashboard": False, **init})
        finally:
            if ray.is_initialized():
                ray.shutdown()

    def held_cpus(self) -> float:
        """CPUs still held by actors or placement groups, after waiting for them to go."""
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while True:
            held = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
            if held < 1e-6 or time.monotonic() > deadline:
                return held
            time.sleep(0.2)


_CLUSTER = RayCluster()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _CLUSTER.starts:
        terminalreporter.write_line(f"shared Ray cluster: started {_CLUSTER.starts} times")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """The process's one Ray cluster (see :data:`RAY_CLUSTER`); shut down at the end."""
    yield _CLUSTER
    _CLUSTER.down()


@pytest.fixture(scope="module")
def ray_session(request: pytest.FixtureRequest, ray_cluster: RayCluster) -> Iterator[None]:
    """The shared Ray cluster, up for the module. At the module's end every CPU its actors held
    must be free again; if not, the cluster is restarted for the next module (and a warning
    names the module), so no module sees another's actors."""
    ray_cluster.up()
    yield
    if ray_cluster.node is not None and (held := ray_cluster.held_cpus()) > 1e-6:
        where = request.node.nodeid
        warnings.warn(
            f"{where}: actors holding {held:g} CPUs outlived it; Ray restarts", stacklevel=2
        )
        ray_cluster.down()


@pytest.fixture
def own_ray(ray_cluster: RayCluster) -> Iterator[Callable[..., Any]]:
    """For a test that needs a Ray of its own (other resources, or actors that inherit an
    environment variable the test sets): ``start(**init)`` starts it (the shared cluster is
    stopped); it is shut down after the test (see :meth:`RayCluster.own`)."""
    with ray_cluster.own() as start:
        yield start


@pytest.fixture
def no_ray(ray_cluster: RayCluster) -> None:
    """For a test that checks that no Ray runs (e.g. a config error caught before Ray starts):
    the shared cluster is stopped (the next test that uses it starts it again)."""
    ray_cluster.down()


@pytest.fixture(autouse=True)
def _shared_ray_back(request: pytest.FixtureRequest, ray_cluster: RayCluster) -> None:
    """In a module that uses the shared cluster, it comes back after a test that stopped it."""
    if "ray_session" in request.fixturenames:
        ray_cluster.up()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` random Qwen2 (+ tokenizer) saved once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), size="tiny", arch="qwen2")


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `small` random Qwen2 (~15M params), built only by tests that ask for it."""
    return build_tiny_model(tmp_path_factory.mktemp("small-qwen2"), size="small", arch="qwen2")
