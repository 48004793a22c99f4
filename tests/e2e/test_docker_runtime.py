"""What only the docker runtime does: pulls, execd copied out of the execd image, labels and the
security defaults of its containers (podman's Docker API at DOCKER_HOST)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig

from harness.docker_api import docker_api, docker_containers, docker_unavailable
from harness.images import EXECD_IMAGE, TEST_IMAGE, built_image
from harness.server_process import ServerProcess
from harness.stale_nat import ephemeral_ports_taken

CREATE = {"image": {"uri": TEST_IMAGE}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 600}
HELPER_LABEL = "opensandbox.io/execd-helper"
CAP_BITS = {"CHOWN": 0, "SETGID": 6, "SETUID": 7, "NET_RAW": 13, "SYS_ADMIN": 21}  # linux/capability.h


@pytest.fixture(scope="module")
def docker_server(tmp_path_factory: pytest.TempPathFactory, docker_host: str) -> Iterator[ServerProcess]:
    """A docker server that takes execd out of the execd image (no execdDir)."""
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"docker runtime: {reason}")
    built_image("execd", EXECD_IMAGE)
    server = ServerProcess(
        tmp_path_factory.mktemp("docker"),
        runtime="docker",
        execd_from_image=True,
        extra_config='defaultMemory = "512Mi"\npidsLimit = 512\n',
    ).start()
    try:
        yield server
    finally:
        server.stop()


def inspect(sandbox_id: str) -> dict[str, Any]:
    response = docker_api("GET", f"/containers/sandbox-{sandbox_id}/json")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_failed_pull_is_a_clean_400_and_leaves_no_container(docker_server: ServerProcess) -> None:
    before = {c["Id"] for c in docker_containers()}
    body = {**CREATE, "image": {"uri": "127.0.0.1:9/nope:1", "auth": {"username": "u", "password": "p"}}}
    response = httpx.post(f"{docker_server.url}/v1/sandboxes", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == "SANDBOX::IMAGE_PULL_FAILED" and "127.0.0.1:9/nope:1" in error["message"]
    assert "p" not in error["message"].split()  # the password is not echoed
    assert {c["Id"] for c in docker_containers()} == before
    assert httpx.get(f"{docker_server.url}/v1/sandboxes").json()["items"] == []


def test_execd_from_the_image_labels_limits_and_security_defaults(docker_server: ServerProcess) -> None:
    body = {**CREATE, "metadata": {"team": "t1"}, "extensions": {"ext": "v"}, "resourceLimits": {"cpu": "500m"}}
    response = httpx.post(f"{docker_server.url}/v1/sandboxes", json=body, timeout=120)
    assert response.status_code == 202, response.text
    sandbox_id = response.json()["id"]
    try:
        assert docker_containers(HELPER_LABEL) == []  # the helper execd was copied from is gone
        container = inspect(sandbox_id)
        labels = container["Config"]["Labels"]
        assert labels["opensandbox.io/id"] == sandbox_id
        assert labels["opensandbox.io/metadata.team"] == "t1" and labels["opensandbox.io/extensions.ext"] == "v"
        assert json.loads(labels["opensandbox.io/entrypoint"]) == ["tail", "-f", "/dev/null"]
        assert labels["opensandbox.io/expires-at"] == response.json()["expiresAt"].replace("+00:00", "Z")
        assert container["Config"]["Entrypoint"] == ["/opt/opensandbox/bin/bootstrap.sh"]
        assert container["Config"]["Cmd"] == ["tail", "-f", "/dev/null"]
        # execd is the execd image's, in one read-only volume named after that image's id
        (mount,) = [m for m in container["Mounts"] if m.get("Destination") == "/opt/opensandbox/bin"]
        image_id = docker_api("GET", f"/images/{EXECD_IMAGE}/json").json()["Id"].removeprefix("sha256:")
        assert mount["Type"] == "volume" and mount["Name"] == f"opensandbox-execd-{image_id[:16]}"
        assert mount["RW"] is False
        host = container["HostConfig"]
        assert host["Memory"] == 512 << 20 and host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 512
        assert "no-new-privileges" in " ".join(host["SecurityOpt"])
        (binding,) = container["NetworkSettings"]["Ports"]["44772/tcp"]
        assert binding["HostIp"] == "127.0.0.1" and int(binding["HostPort"]) > 0

        async def probe() -> tuple[list[str], int | None]:
            sb = await Sandbox.connect(sandbox_id, connection_config=ConnectionConfig(domain=docker_server.domain))
            try:
                run = await sb.commands.run("grep -E '^(NoNewPrivs|CapEff)' /proc/self/status | tr -s '\\t' ' '")
                as_root = await sb.commands.run("id -u")
                # root in the sandbox cannot change the execd every sandbox shares
                tamper = await sb.commands.run("touch /opt/opensandbox/bin/execd")
                assert tamper.exit_code != 0
                return [m.text for m in run.logs.stdout], as_root.exit_code
            finally:
                await sb.close()

        status, code = asyncio.run(probe())
        assert "NoNewPrivs: 1" in status and code == 0
        (effective,) = [int(line.split()[1], 16) for line in status if line.startswith("CapEff")]
        has = {name: bool(effective >> bit & 1) for name, bit in CAP_BITS.items()}
        assert has == {"CHOWN": True, "SETGID": True, "SETUID": True, "NET_RAW": False, "SYS_ADMIN": False}
        # A paused sandbox is not proxied to (its execd would never answer).
        assert httpx.post(f"{docker_server.url}/v1/sandboxes/{sandbox_id}/pause").status_code == 202
        assert inspect(sandbox_id)["State"]["Status"] == "paused"
        proxied = httpx.get(f"{docker_server.url}/v1/sandboxes/{sandbox_id}/proxy/44772/ping")
        assert proxied.status_code == 409
    finally:
        assert httpx.delete(f"{docker_server.url}/v1/sandboxes/{sandbox_id}", timeout=60).status_code == 204
    assert docker_api("GET", f"/containers/sandbox-{sandbox_id}/json").status_code == 404
    assert not (docker_server.state_dir / f"{sandbox_id}.json").exists()


def test_a_container_that_exits_before_execd_is_a_500_and_is_removed(docker_server: ServerProcess) -> None:
    before = {c["Id"] for c in docker_containers()}
    body = {**CREATE, "env": {"EXECD": "/nonexistent"}, "entrypoint": ["true"]}
    response = httpx.post(f"{docker_server.url}/v1/sandboxes", json=body, timeout=120)
    assert response.status_code in (400, 500), response.text
    assert set(response.json()) == {"code", "message"}
    assert {c["Id"] for c in docker_containers()} == before


def test_a_lost_execd_volume_fails_one_create_and_is_made_again(tmp_path: Path, docker_host: str) -> None:
    """Someone removed execd's volume (a prune) while the server ran: the create that finds it empty
    fails (execd never starts), and the next one fills the volume again."""
    reason = docker_unavailable()
    if reason:
        pytest.skip(f"docker runtime: {reason}")
    server = ServerProcess(tmp_path, runtime="docker", extra_config="startTimeoutSeconds = 5\n").start()
    try:
        first = httpx.post(f"{server.url}/v1/sandboxes", json=CREATE, timeout=120)
        assert first.status_code == 202, first.text
        (mount,) = [m for m in inspect(first.json()["id"])["Mounts"] if m.get("Destination") == "/opt/opensandbox/bin"]
        assert httpx.delete(f"{server.url}/v1/sandboxes/{first.json()['id']}", timeout=60).status_code == 204
        assert docker_api("DELETE", f"/volumes/{mount['Name']}").status_code in (200, 204)

        lost = httpx.post(f"{server.url}/v1/sandboxes", json=CREATE, timeout=120)
        assert lost.status_code == 500 and lost.json()["code"] == "SANDBOX::START_FAILED", lost.text
        again = httpx.post(f"{server.url}/v1/sandboxes", json=CREATE, timeout=120)
        assert again.status_code == 202, again.text
        assert httpx.delete(f"{server.url}/v1/sandboxes/{again.json()['id']}", timeout=60).status_code == 204
    finally:
        server.stop()


def test_a_starting_server_leaves_another_servers_create_alone(tmp_path: Path, docker_host: str) -> None:
    # Two never-started sandbox containers on the shared engine: one made a moment ago (another
    # server's create under way), one made an hour ago (a create cut short by a server stop).
    import datetime as dt

    from opensandbox_platform.daemon import times
    from opensandbox_platform.server.runtimes import docker_model
    from opensandbox_platform.server.runtimes.base import SandboxSpec

    made = {}
    for name, age in (("young", 0), ("old", 3600)):
        sandbox_id = f"unstarted-{name}-{tmp_path.name[-8:]}"
        at = times.now() - dt.timedelta(seconds=age)
        labels = docker_model.encode_labels(sandbox_id, SandboxSpec(image=TEST_IMAGE, entrypoint=["true"]), at)
        body = {"Image": TEST_IMAGE, "Cmd": ["true"], "Labels": labels}
        response = docker_api("POST", f"/containers/create?name=sandbox-{sandbox_id}", json=body)
        assert response.status_code == 201, response.text
        made[name] = response.json()["Id"]

    def exists(container_id: str) -> bool:
        return docker_api("GET", f"/containers/{container_id}/json").status_code == 200

    quick = "apiTimeoutSeconds = 1\nstartTimeoutSeconds = 1\nhealthIntervalSeconds = 0.2\n"
    server = ServerProcess(tmp_path / "server", runtime="docker", extra_config=quick).start()
    try:
        assert not exists(made["old"])
        assert exists(made["young"])  # not the starting server's to remove yet
        deadline = time.monotonic() + 15
        while exists(made["young"]):  # still never started after any create would have given up
            assert time.monotonic() < deadline, "never removed"
            time.sleep(0.2)
    finally:
        server.stop()
        for container_id in made.values():
            docker_api("DELETE", f"/containers/{container_id}?force=true")


def test_a_published_port_that_leads_elsewhere_fails_the_create(docker_server: ServerProcess) -> None:
    # The engine's NAT rules for published ports come first: one left behind for a removed container
    # takes a new container's port. Both tries (each on a port podman picks) lead to the decoy.
    mark = f"leads-elsewhere-{time.monotonic_ns()}"
    with ephemeral_ports_taken():
        body = {**CREATE, "metadata": {"test": mark}}
        response = httpx.post(f"{docker_server.url}/v1/sandboxes", json=body, timeout=120)
    assert response.status_code == 500, response.text
    error = response.json()
    assert error["code"] == "SANDBOX::START_FAILED"
    assert "published port" in error["message"] and "does not reach the container" in error["message"]
    labels = [c.get("Labels") or {} for c in docker_containers()]
    assert not [x for x in labels if x.get("opensandbox.io/metadata.test") == mark]  # both tries removed
