"""Fixtures of the integration tests on the real node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.real_node import RealNode, RealNodeUnavailable, real_node
from harness.services import LocalCluster


@pytest.fixture(scope="session")
def node(cluster: LocalCluster) -> Iterator[RealNode]:
    """The real node (harness/real_node.py); its tests are skipped when it is switched off."""
    try:
        with real_node(cluster) as n:
            yield n
    except RealNodeUnavailable as off:
        pytest.skip(str(off))
