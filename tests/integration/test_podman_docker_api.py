"""podman's Docker Engine API, driven by the Docker SDK for Python, as the docker runtime will use it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import docker
import httpx
import pytest
from docker.models.containers import Container

from harness.images import TEST_IMAGE


@pytest.fixture
def client(docker_host: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=docker_host)


@pytest.fixture
def container(client: docker.DockerClient) -> Iterator[Container]:
    name = f"osb-test-{uuid.uuid4().hex[:8]}"
    c = client.containers.run(
        TEST_IMAGE,
        ["busybox", "httpd", "-f", "-p", "8000", "-h", "/srv"],
        name=name,
        detach=True,
        ports={"8000/tcp": ("127.0.0.1", None)},
        mem_limit="64m",
        nano_cpus=500_000_000,
        volumes={},
        labels={"opensandbox.io/test": "true"},
    )
    yield c
    c.remove(force=True)
    assert name not in [x.name for x in client.containers.list(all=True)]


def test_test_image_has_a_shell_but_no_python(client: docker.DockerClient) -> None:
    out = client.containers.run(
        TEST_IMAGE, ["sh", "-c", "ls /bin/bash /usr/bin/env; command -v python3 || echo no-python"], remove=True
    )
    assert out.decode().splitlines()[-1] == "no-python"


def test_published_port_answers_and_limits_are_in_the_cgroup(container: Container) -> None:
    container.exec_run(["sh", "-c", "mkdir -p /srv && echo sandbox-ok > /srv/index.html"])
    container.reload()
    port = int(container.ports["8000/tcp"][0]["HostPort"])
    assert container.ports["8000/tcp"][0]["HostIp"] in ("127.0.0.1", "")

    deadline = time.monotonic() + 10
    while True:
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/index.html")
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "published port did not answer"
            time.sleep(0.1)
    assert response.text.strip() == "sandbox-ok"

    memory = container.exec_run(["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).output.decode()
    assert int(memory) == 64 * 1024 * 1024
    quota = int(container.exec_run(["cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"]).output)
    period = int(container.exec_run(["cat", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"]).output)
    assert quota / period == pytest.approx(0.5)
