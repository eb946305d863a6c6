from collections.abc import Iterator

import pytest

from gad_ray.synthetic.server import RunningServer, start_server_thread


@pytest.fixture(scope="module")
def teacher_server() -> Iterator[RunningServer]:
    """A fault-free synthetic teacher on a free loopback port, shared by a test module."""
    with start_server_thread(seed=0) as server:
        yield server


@pytest.fixture
def server(teacher_server: RunningServer) -> RunningServer:
    """The shared server with fresh stats and re-seeded random streams."""
    teacher_server.reset()
    return teacher_server
