"""Shared fixtures: the local cluster (session), a fresh namespace per test, podman's Docker API."""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator

import pytest
from lightkube import Client, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from harness.controller_process import ControllerProcess
from harness.services import LocalCluster, local_cluster, podman_docker_host


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster() as c:
        yield c


@pytest.fixture(scope="session")
def kube(cluster: LocalCluster) -> Client:
    return Client(config=KubeConfig.from_file(cluster.kubeconfig), field_manager="opensandbox-tests")


@pytest.fixture
def namespace(kube: Client) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.create(Namespace(metadata=ObjectMeta(name=name, labels={"opensandbox.io/test": "true"})))
    yield name
    kube.delete(Namespace, name)


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    with podman_docker_host() as host:
        yield host


PARTS = ("all", "cluster", "host")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        choices=PARTS,
        default="all",
        help="only the tests that use the test cluster (cluster) or only the others (host); "
        "`make test` runs the two parts at once (tools/test.sh)",
    )


def uses_the_cluster(item: pytest.Item) -> bool:
    """A test of the cluster part: it asks for the cluster, or runs a kubernetes-parametrized case (the
    security battery's kubernetes target starts the cluster itself)."""
    callspec = getattr(item, "callspec", None)
    return "cluster" in getattr(item, "fixturenames", ()) or (
        callspec is not None and "kubernetes" in callspec.params.values()
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder: tests/unit, tests/integration, tests/e2e, tests/security; with
    --part, keep the tests of that part only."""
    for item in items:
        for kind in ("unit", "integration", "e2e", "security"):
            if f"/tests/{kind}/" in str(item.path):
                item.add_marker(getattr(pytest.mark, kind))
    part = config.getoption("part")
    if part == "all":
        return
    kept = [item for item in items if uses_the_cluster(item) == (part == "cluster")]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> None:
    """The generated CRDs, applied once per session (server-side apply: idempotent)."""
    from harness.paths import CRDS

    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    for plural in ("pools", "batchsandboxes"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{plural}.sandbox.opensandbox.io", "--timeout=30s")


@pytest.fixture
def controller(cluster: LocalCluster, crds: None, namespace: str) -> Iterator[ControllerProcess]:
    """The controller program, watching only this test's namespace."""
    proc = ControllerProcess(cluster, namespace).start()
    yield proc
    proc.stop()


# --- a failed test's report carries what the servers it used logged meanwhile -----------------------------------
LOG_OFFSETS = pytest.StashKey[dict[int, int]]()
LOG_TAIL_CHARS = 6000


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    from harness.server_process import ServerSubprocess

    item.stash[LOG_OFFSETS] = {id(s): s.log_size() for s in ServerSubprocess.started}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when == "call":
        from harness.server_process import ServerSubprocess

        offsets = item.stash.get(LOG_OFFSETS, {})
        for server in ServerSubprocess.started:
            text = server.log_since(offsets.get(id(server), 0))
            if text.strip():
                report.sections.append((f"server {server.domain} log during the test", text[-LOG_TAIL_CHARS:]))
    return report
