"""The server shared by the e2e tests of one session, once per runtime under test.

`runtime_name` is parametrized over `OSB_E2E_RUNTIMES` (default local,docker); tests that start
their own server take it too, so they run with each runtime. The docker runtime starts podman's
Docker API (the `docker_host` fixture) and fails when it cannot start; a runtime whose other parts
are missing here is skipped with the reason; tests of one runtime's internals skip the others themselves.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.server_process import FLAVORS, ServerProcess, running_server, runtimes_under_test
from tests.e2e.code_support import create_sync


@pytest.fixture(scope="session", params=runtimes_under_test())
def runtime_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "docker":
        request.getfixturevalue("docker_host")  # podman's Docker API (started if it is not running)
    reason = FLAVORS[name].unavailable()
    if reason:
        pytest.skip(f"{name} runtime: {reason}")
    return name


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, runtime_name: str) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp(f"server-{runtime_name}"), runtime=runtime_name) as srv:
        yield srv


@pytest.fixture(scope="module")
def shared_sandbox(server: ServerProcess) -> Iterator[str]:
    """One sandbox with Jupyter kernels for the code-interpreter tests of a module that need no
    sandbox of their own (they each use their own contexts)."""
    sandbox = create_sync(server)
    yield sandbox.id
    sandbox.kill()
    sandbox.close()
