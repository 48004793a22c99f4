"""The server (local runtime) shared by the e2e tests of one session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server_support import ServerProcess, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv
