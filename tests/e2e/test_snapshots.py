"""Snapshots through the official SDK (opensandbox 1.1.1), on the local and docker runtimes:
a sandbox created from a snapshot sees its files and env; list/get/delete; a 200 MiB
workspace; bad input; a hostile sandbox's snapshot harms nothing and leaks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opensandbox import Sandbox, SandboxManager
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import SnapshotFilter

from harness.images import TEST_IMAGE
from harness.ports import free_port
from harness.server_process import ServerProcess

SMALL = {"cpu": "500m", "memory": "1Gi"}


def config(server: ServerProcess) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, api_key=server.api_key or None, disable_metrics=True)


def images(server: ServerProcess) -> list[str]:
    """local: the minimal root and an image's overlay (whiteouts, opaque directories); docker: the image."""
    return [server.image, TEST_IMAGE] if server.runtime == "local" else [server.image]


@contextlib.asynccontextmanager
async def sandbox(server: ServerProcess, image: str | None = None, **kwargs: Any) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(image, connection_config=config(server), resource=SMALL, **kwargs)
    try:
        yield sb
    finally:
        with contextlib.suppress(SandboxApiException):
            await sb.kill()
        await sb.close()


TAKEN: set[str] = set()  # every snapshot a test waited for: removed at the end even if the test failed


@pytest.fixture(scope="module", autouse=True)
def leave_no_snapshot(server: ServerProcess) -> Iterator[None]:
    """A docker snapshot is an image on the (shared) engine: none of ours may outlive the module."""
    yield
    for snapshot_id in sorted(TAKEN):
        raw(server, "DELETE", f"/snapshots/{snapshot_id}")  # 204; 404 if deleted or the other runtime's


async def ready(manager: SandboxManager, snapshot_id: str, timeout: float = 120) -> Any:
    """Poll the snapshot (as the spec says to) until it is no longer Creating."""
    TAKEN.add(snapshot_id)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await manager.get_snapshot(snapshot_id)
        if info.status.state != "Creating":
            return info
        assert asyncio.get_running_loop().time() < deadline, f"snapshot {snapshot_id} still Creating"
        await asyncio.sleep(0.1)


async def run(sb: Sandbox, command: str) -> str:
    execution = await sb.commands.run(command)
    assert execution.error is None, execution.error
    return "\n".join(m.text.rstrip("\n") for m in execution.logs.stdout)


PREPARE = """
set -e
mkdir -p /workspace/project/src /root/.cache/pip /opt/tool
echo 'print("hello")' > /workspace/project/src/main.py
echo cached > /root/.cache/pip/wheel
printf '#!/bin/sh\\necho tool-ran\\n' > /opt/tool/run && chmod 0750 /opt/tool/run
ln -s ../project/src/main.py /workspace/link-to-main
echo gone > /workspace/deleted && rm /workspace/deleted
mkfifo /workspace/fifo
echo done
"""
CHECK = """
cat /workspace/project/src/main.py; cat /root/.cache/pip/wheel; /opt/tool/run
stat -c '%a' /opt/tool/run; readlink /workspace/link-to-main; test -e /workspace/deleted || echo no-deleted
test -p /workspace/fifo && echo fifo; echo "FROM_SNAPSHOT=$FROM_SNAPSHOT"
"""


async def test_a_sandbox_from_a_snapshot_sees_its_files_and_env(server: ServerProcess) -> None:
    manager = await SandboxManager.create(config(server))
    for image in images(server):
        async with sandbox(server, image, env={"FROM_SNAPSHOT": "kept"}, entrypoint=["sleep", "infinity"]) as source:
            assert (await run(source, PREPARE)).strip() == "done"
            if image == TEST_IMAGE:  # over an image: a file of the image removed, a directory replaced
                await run(source, "rm /etc/debian_version; rm -rf /usr/share/doc && mkdir /usr/share/doc")
            snapshot = await source.create_snapshot(name=f"checkpoint {image}")
            assert snapshot.status.state in ("Creating", "Ready") and snapshot.sandbox_id == source.id
            info = await ready(manager, snapshot.id)
            assert info.status.state == "Ready", info.status
            assert info.name == f"checkpoint {image}" and info.status.reason == "snapshot_ready"
            await run(source, "echo after > /workspace/after-snapshot")

        restored = await Sandbox.create(snapshot_id=snapshot.id, connection_config=config(server), resource=SMALL)
        try:
            got = await run(restored, CHECK)
            assert got.split("\n") == [
                'print("hello")', "cached", "tool-ran", "750", "../project/src/main.py", "no-deleted", "fifo",
                "FROM_SNAPSHOT=kept",
            ]  # fmt: skip
            assert "after" not in await run(restored, "ls /workspace")
            fetched = await manager.get_sandbox_info(restored.id)
            assert fetched.entrypoint == ["tail", "-f", "/dev/null"]  # not the source's: the SDK sends its default
            if image == TEST_IMAGE:
                got = await run(restored, "test -e /etc/debian_version || echo no-file; ls -A /usr/share/doc | wc -l")
                assert got.split() == ["no-file", "0"]  # the whiteout and the opaque directory held
            # what the jail writes itself is this sandbox's, not the snapshot's
            assert restored.id[:12] in await run(restored, "cat /etc/hostname")
        finally:
            await restored.kill()
            await restored.close()
        await manager.delete_snapshot(snapshot.id)
    await manager.close()


async def test_list_get_delete_and_delete_in_use_is_refused(server: ServerProcess) -> None:
    manager = await SandboxManager.create(config(server))
    async with sandbox(server, server.image) as source:
        await run(source, "echo one > /workspace/one")
        first = await source.create_snapshot(name="first")
        second = await source.create_snapshot()
        for snap in (first, second):
            assert (await ready(manager, snap.id)).status.state == "Ready"
        listed = await manager.list_snapshots(SnapshotFilter(sandbox_id=source.id))
        assert {s.id for s in listed.snapshot_infos} == {first.id, second.id}
        named = await manager.list_snapshots(SnapshotFilter(name="first"))
        assert [s.id for s in named.snapshot_infos] == [first.id]
        failed_only = await manager.list_snapshots(SnapshotFilter(sandbox_id=source.id, states=["Failed"]))
        assert failed_only.snapshot_infos == []

    restored = await Sandbox.create(snapshot_id=first.id, connection_config=config(server), resource=SMALL)
    assert (await manager.get_sandbox_info(restored.id)).snapshot_id == first.id
    bare = raw(server, "POST", "/sandboxes", json={"snapshotId": first.id, "resourceLimits": SMALL, "timeout": 300})
    assert bare.status_code == 202, bare.text
    assert bare.json()["entrypoint"] == ["tail", "-f", "/dev/null"]  # the spec's default for a restore
    assert raw(server, "DELETE", f"/sandboxes/{bare.json()['id']}").status_code == 204
    with pytest.raises(SandboxApiException) as refused:
        await manager.delete_snapshot(first.id)
    assert refused.value.status_code == 409 and "in use" in str(refused.value)
    await manager.delete_snapshot(second.id)  # not in use: gone
    await restored.kill()
    await restored.close()
    await manager.delete_snapshot(first.id)
    for gone in (first.id, second.id):
        with pytest.raises(SandboxApiException) as missing:
            await manager.get_snapshot(gone)
        assert missing.value.status_code == 404
    await manager.close()


async def test_a_200_mib_workspace(server: ServerProcess) -> None:
    manager = await SandboxManager.create(config(server))
    async with sandbox(server, server.image) as source:
        digest = await run(
            source, "head -c 209715200 /dev/urandom > /workspace/big && sha256sum /workspace/big | cut -d' ' -f1"
        )
        snapshot = await source.create_snapshot()
        assert (await ready(manager, snapshot.id)).status.state == "Ready"
    async with sandbox(server, None, snapshot_id=snapshot.id) as restored:
        if server.runtime == "local":  # the restored pages are the new sandbox's memory, not the server's
            assert memory_charged(server, restored.id) >= 200 << 20
        assert await run(restored, "sha256sum /workspace/big | cut -d' ' -f1") == digest
    if server.runtime == "local":  # so a memory limit below the files is refused up front, not a 500 later
        small = {"snapshotId": snapshot.id, "resourceLimits": {"cpu": "500m", "memory": "256Mi"}, "timeout": 300}
        refused = raw(server, "POST", "/sandboxes", json=small)
        assert (refused.status_code, refused.json()["code"]) == (400, "SANDBOX::INVALID_PARAMETER"), refused.text
        assert "resourceLimits.memory" in refused.json()["message"]
    await manager.delete_snapshot(snapshot.id)
    await manager.close()


def memory_charged(server: ServerProcess, sandbox_id: str) -> int:
    """What the local sandbox's memory cgroup holds (its tmpfs pages included)."""
    record = next(r for r in server.records() if r["id"] == sandbox_id)
    memory = Path(record["cgroups"]["memory"])  # type: ignore[index]
    return int((memory / "memory.usage_in_bytes").read_text())


def raw(server: ServerProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}/v1{path}", headers=server.headers(), timeout=60, **kwargs)


async def test_bad_input_is_a_4xx_with_code_and_message(server: ServerProcess) -> None:
    cases = [
        ("POST", "/sandboxes/no-such-sandbox/snapshots", {"json": {}}, 404, "SANDBOX::NOT_FOUND"),
        ("GET", "/snapshots/snap-unknown", {}, 404, "SNAPSHOT::NOT_FOUND"),
        ("DELETE", "/snapshots/snap-unknown", {}, 404, "SNAPSHOT::NOT_FOUND"),
        ("GET", "/snapshots?state=Bogus", {}, 400, "SANDBOX::INVALID_PARAMETER"),
        ("POST", "/sandboxes", {"json": {"snapshotId": "snap-unknown"}}, 400, "SANDBOX::INVALID_PARAMETER"),
        (
            "POST",
            "/sandboxes",
            {"json": {"snapshotId": "x", "image": {"uri": "a"}, "entrypoint": ["a"]}},
            400,
            "SANDBOX::INVALID_PARAMETER",
        ),
        ("POST", "/sandboxes", {"json": {"entrypoint": ["a"]}}, 400, "SANDBOX::INVALID_PARAMETER"),
        ("POST", "/sandboxes", {"json": {"image": {"uri": "a"}}}, 400, "SANDBOX::INVALID_PARAMETER"),
    ]
    for method, path, kwargs, status, code in cases:
        answer = raw(server, method, path, **kwargs)
        assert (answer.status_code, answer.json()["code"]) == (status, code), (path, answer.text)
        assert answer.json()["message"]
    manager = await SandboxManager.create(config(server))
    async with sandbox(server, server.image) as sb:
        accepted = raw(server, "POST", f"/sandboxes/{sb.id}/snapshots", json={"name": "raw"})
        assert accepted.status_code == 202 and accepted.json()["status"]["state"] in ("Creating", "Ready")
        assert accepted.headers["location"] == f"/v1/snapshots/{accepted.json()['id']}"
        await ready(manager, accepted.json()["id"])
        await manager.delete_snapshot(accepted.json()["id"])
        for body in ({"name": ""}, {"name": "x" * 300}, {"name": "a\nb"}, {"unknown": 1}):
            answer = raw(server, "POST", f"/sandboxes/{sb.id}/snapshots", json=body)
            assert (answer.status_code, answer.json()["code"]) == (400, "SANDBOX::INVALID_PARAMETER"), body
        await sb.pause()
        paused = raw(server, "POST", f"/sandboxes/{sb.id}/snapshots", json={})
        assert (paused.status_code, paused.json()["code"]) == (409, "SNAPSHOT::INVALID_SOURCE_STATE")
        assert raw(server, "GET", f"/snapshots?sandboxId={sb.id}").json()["items"] == []  # nothing half-made
    await manager.close()


async def test_a_sandbox_whose_entrypoint_ended_is_not_captured(server: ServerProcess) -> None:
    body = {
        "image": {"uri": server.image},
        "entrypoint": ["sh", "-c", "sleep 1"],
        "timeout": 300,
        "resourceLimits": SMALL,
    }
    created = raw(server, "POST", "/sandboxes", json=body)
    assert created.status_code == 202, created.text
    sandbox_id = created.json()["id"]
    try:
        for _ in range(300):
            state = raw(server, "GET", f"/sandboxes/{sandbox_id}").json()["status"]["state"]
            if state not in ("Pending", "Running"):
                break
            await asyncio.sleep(0.1)
        answer = raw(server, "POST", f"/sandboxes/{sandbox_id}/snapshots", json={})
        assert (answer.status_code, answer.json()["code"]) == (409, "SNAPSHOT::INVALID_SOURCE_STATE"), answer.text
        assert state in answer.json()["message"]
    finally:
        raw(server, "DELETE", f"/sandboxes/{sandbox_id}")


def host_file(path: str) -> bytes:
    p = Path(path)
    return p.read_bytes() if p.exists() else b""


HOSTILE = """
set -e
ln -s /etc/shadow /workspace/shadow-link
ln -s / /workspace/root-link
mkdir -p /workspace/dir && ln -s /etc /workspace/dir/etc
cp /bin/sh /workspace/suid-sh && chmod 4755 /workspace/suid-sh
mknod /workspace/null-dev c 1 3 2>/dev/null || echo no-mknod
echo ok
"""


async def test_a_hostile_sandbox_cannot_reach_the_host_through_its_snapshot(server: ServerProcess) -> None:
    manager = await SandboxManager.create(config(server))
    shadow = host_file("/etc/shadow")
    async with sandbox(server, server.image) as source:
        assert (await run(source, HOSTILE)).strip().endswith("ok")
        snapshot = await source.create_snapshot()
        assert (await ready(manager, snapshot.id)).status.state == "Ready"
    async with sandbox(server, None, snapshot_id=snapshot.id) as restored:
        got = await run(
            restored,
            "readlink /workspace/shadow-link /workspace/root-link /workspace/dir/etc; "
            "stat -c '%a' /workspace/suid-sh; test -e /workspace/null-dev && echo dev || echo no-dev",
        )
        assert got.split() == ["/etc/shadow", "/", "/etc", "4755", "no-dev"]
        # the links are the sandbox's own: they resolve inside it, to its files (its image's shadow
        # where it may read one), never to the host's
        inside = await run(restored, "cat /workspace/shadow-link 2>&1 || true")
        assert not shadow or inside.strip() != shadow.decode(errors="replace").strip()
    if shadow:
        assert host_file("/etc/shadow") == shadow
    await manager.delete_snapshot(snapshot.id)
    await manager.close()


# The bound each runtime enforces, set low for the test: the sparse file is 1 GiB, so even a broken
# check could make the engine write 1 GiB, not fill the disk (a 64 GiB sparse file once did, before
# the docker runtime measured its layer: podman's commit wrote 58 GB into /var/tmp).
SPARSE_BOUND = {"local": "diskSizeMib = 256", "docker": "snapshotMaxSizeMib = 256"}


async def test_a_huge_sparse_file_fails_the_snapshot_instead_of_filling_the_disk(
    tmp_path: Path, runtime_name: str
) -> None:
    own = ServerProcess(tmp_path, runtime=runtime_name, extra_config=SPARSE_BOUND[runtime_name]).start()
    try:
        manager = await SandboxManager.create(config(own))
        async with sandbox(own, own.image) as source:
            await run(source, "truncate -s 1G /workspace/sparse && echo ok")
            snapshot = await source.create_snapshot()
            info = await ready(manager, snapshot.id, timeout=60)
            assert info.status.state == "Failed", info.status
            assert info.status.reason == "snapshot_too_large" and "256 MiB" in (info.status.message or "")
            assert (await run(source, "echo still-running")).strip() == "still-running"  # thawed after the capture
            body = {"snapshotId": snapshot.id, "entrypoint": ["sleep", "60"]}
            answer = raw(own, "POST", "/sandboxes", json=body)
            assert (answer.status_code, answer.json()["code"]) == (409, "SNAPSHOT::INVALID_STATE")
        await manager.delete_snapshot(snapshot.id)  # a failed snapshot can be deleted
        await manager.close()
    finally:
        own.stop()


async def test_hard_links_count_per_name_so_a_restore_fits_the_sandbox(server: ServerProcess) -> None:
    """A restore writes each name as a file: 12 names of a 100 MiB file would be 1.2 GiB in the new
    sandbox, more than its disk; the capture refuses it rather than a restore failing or filling."""
    if server.runtime != "local":
        pytest.skip("docker: a commit keeps hard links as such (the engine's layer)")
    manager = await SandboxManager.create(config(server))
    async with sandbox(server, server.image) as source:
        await run(
            source, "head -c 104857600 /dev/zero > /tmp/data && for i in $(seq 12); do ln /tmp/data /tmp/l$i; done"
        )
        snapshot = await source.create_snapshot()
        info = await ready(manager, snapshot.id)
        assert (info.status.state, info.status.reason) == ("Failed", "snapshot_too_large"), info.status
    await manager.delete_snapshot(snapshot.id)
    await manager.close()


async def test_a_restore_lands_only_in_the_new_sandbox(server: ServerProcess, tmp_path: Path) -> None:
    """Links the source planted to host paths stay links inside the new sandbox: nothing of the
    snapshot is written through them on the host."""
    host_dir = tmp_path / "host-target"  # exists on the host only
    manager = await SandboxManager.create(config(server))
    async with sandbox(server, server.image) as source:
        await run(source, f"ln -s {host_dir} /workspace/door && mkdir -p {host_dir} && echo planted > {host_dir}/f")
        snapshot = await source.create_snapshot()
        assert (await ready(manager, snapshot.id)).status.state == "Ready"
    async with sandbox(server, None, snapshot_id=snapshot.id) as restored:
        assert (await run(restored, "cat /workspace/door/f")).strip() == "planted"  # its own copy, inside it
        await run(restored, "echo written-inside > /workspace/door/g")
    assert not host_dir.exists()
    await manager.delete_snapshot(snapshot.id)
    await manager.close()


async def test_snapshots_and_their_use_survive_a_server_restart(tmp_path: Path, runtime_name: str) -> None:
    own = ServerProcess(tmp_path, runtime=runtime_name).start()
    try:
        manager = await SandboxManager.create(config(own))
        async with sandbox(own, own.image) as source:
            await run(source, "echo kept > /workspace/kept")
            snapshot = await source.create_snapshot(name="survivor")
            assert (await ready(manager, snapshot.id)).status.state == "Ready"
        restored = await Sandbox.create(snapshot_id=snapshot.id, connection_config=config(own), resource=SMALL)
        await restored.close()
        await manager.close()

        own.stop(cleanup=False)
        own.port = free_port()
        own.start()

        manager = await SandboxManager.create(config(own))
        info = await manager.get_snapshot(snapshot.id)
        assert (info.status.state, info.name) == ("Ready", "survivor")
        assert (await manager.get_sandbox_info(restored.id)).snapshot_id == snapshot.id
        with pytest.raises(SandboxApiException) as refused:
            await manager.delete_snapshot(snapshot.id)  # still in use by the restored sandbox
        assert refused.value.status_code == 409
        async with sandbox(own, None, snapshot_id=snapshot.id) as again:
            assert (await run(again, "cat /workspace/kept")).strip() == "kept"
        await manager.kill_sandbox(restored.id)
        await manager.delete_snapshot(snapshot.id)
        await manager.close()
    finally:
        own.stop()


async def test_a_snapshot_of_a_restored_sandbox(server: ServerProcess) -> None:
    """A chain: B is taken of a sandbox restored from A. B holds A's files and its own; deleting A
    while B exists is either done (local: B holds its own copy) or a 409 (docker: B's image is built
    over A's), never a 500, and B restores either way."""
    manager = await SandboxManager.create(config(server))
    async with sandbox(server, server.image) as source:
        await run(source, "echo a > /workspace/a")
        first = await source.create_snapshot()
        assert (await ready(manager, first.id)).status.state == "Ready"
    async with sandbox(server, None, snapshot_id=first.id) as middle:
        await run(middle, "echo b > /workspace/b && rm /workspace/a && echo a2 > /workspace/a2")
        second = await middle.create_snapshot()
        assert (await ready(manager, second.id)).status.state == "Ready"
    answer = raw(server, "DELETE", f"/snapshots/{first.id}")
    assert answer.status_code in (204, 409), answer.text
    if answer.status_code == 409:
        assert answer.json()["code"] == "SNAPSHOT::IN_USE" and answer.json()["message"]
    async with sandbox(server, None, snapshot_id=second.id) as last:
        assert (await run(last, "ls /workspace")).split() == ["a2", "b"]
    await manager.delete_snapshot(second.id)
    if answer.status_code == 409:
        await manager.delete_snapshot(first.id)  # once B is gone
    await manager.close()


async def test_the_local_store_is_bounded_in_total(tmp_path: Path, runtime_name: str) -> None:
    """Snapshot after snapshot of new data cannot fill the host's disk: once the store could go above
    local.snapshotStoreMaxMib, a capture is Failed (and deleting a snapshot makes room again)."""
    if runtime_name != "local":
        pytest.skip("docker: the engine's image storage is the operator's (docker.snapshotMaxSizeMib per snapshot)")
    own = ServerProcess(tmp_path, extra_config="diskSizeMib = 32\nsnapshotStoreMaxMib = 48").start()
    try:
        manager = await SandboxManager.create(config(own))
        async with sandbox(own, own.image) as source:
            await run(source, "head -c 20971520 /dev/urandom > /workspace/one")
            first = await source.create_snapshot()
            assert (await ready(manager, first.id)).status.state == "Ready"
            await run(source, "head -c 20971520 /dev/urandom > /workspace/one")
            second = await source.create_snapshot()
            info = await ready(manager, second.id)
            assert (info.status.state, info.status.reason) == ("Failed", "snapshot_too_large")
            assert "snapshotStoreMaxMib" in (info.status.message or "")
            await manager.delete_snapshot(first.id)
            third = await source.create_snapshot()
            assert (await ready(manager, third.id)).status.state == "Ready"
        for snapshot in (second, third):
            await manager.delete_snapshot(snapshot.id)
        await manager.close()
    finally:
        own.stop()
