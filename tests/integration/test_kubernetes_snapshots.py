"""Snapshots on the kubernetes runtime through the official SDK, on the real node: a committer pod takes
the sandbox container's writable layer and pushes an image to the cluster registry; a sandbox created
from the snapshot runs that image and sees the files. A hostile sandbox's links and huge sparse files
harm neither the node nor the committer. Pause and resume, of a direct and of a pooled sandbox (which
leaves its Pool: a fresh pod on resume, never a warm one). docs/snapshots.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube import Client
from lightkube.resources.core_v1 import ConfigMap, Pod
from opensandbox import Sandbox, SandboxManager
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import SnapshotFilter

from harness.controller_process import ControllerProcess
from harness.kube import BatchSandbox, Pool, eventually, gone, idle_ready, pool_manifest, pool_pods, status
from harness.kubernetes_server import (
    SMALL,
    KubernetesServer,
    kubernetes_server,
    load_committer_image,
    registry_base_image,
    snapshot_server_config,
)
from harness.real_node import RealNode, real_node_pod_spec
from harness.registry import Registry, cluster_registry, private_registry
from harness.services import LocalCluster
from opensandbox_platform.api import labels
from opensandbox_platform.server.runtimes import kubernetes_committer as committer
from tests.integration.test_server_kubernetes_real_node import created as sandbox
from tests.integration.test_server_kubernetes_real_node import sdk_config as sdk
from tests.integration.test_server_kubernetes_real_node import stdout_of as run

BOUND_MIB = 256
AUTH_PORT = 5003  # test_registry.py's private registry uses 5001, test_image_auth.py's 5002
CREDENTIALS = ("osb-snapshots", "right-password")


@pytest.fixture(scope="session")
def registry(node: RealNode) -> Registry:
    return cluster_registry()


@pytest.fixture(scope="session")
def base_image(registry: Registry) -> str:
    return registry_base_image(registry)


@pytest.fixture(scope="session")
def committer_image(node: RealNode) -> str:
    return load_committer_image(node)


@pytest.fixture
def server(
    cluster: LocalCluster,
    namespace: str,
    execd_controller: ControllerProcess,
    registry: Registry,
    committer_image: str,
    tmp_path: Path,
) -> Iterator[KubernetesServer]:
    config = snapshot_server_config(registry, committer_image, BOUND_MIB)
    with kubernetes_server(tmp_path, namespace, cluster.kubeconfig, config) as srv:
        yield srv


def no_committer(kube: Client, namespace: str) -> None:
    """The server deletes the committer pod once it read its outcome."""
    eventually(
        lambda: not [p for p in kube.list(Pod, namespace=namespace) if p.metadata.name.endswith("-commit")],
        timeout=30,
        what="the committer pod deleted",
    )


def pushed_tags(registry: Registry) -> list[str]:
    try:
        return registry.tags("osb-tests/snapshots")
    except httpx.HTTPStatusError:  # 404: nothing was ever pushed there
        return []


async def settled(manager: SandboxManager, snapshot_id: str, timeout: float = 180) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while (info := await manager.get_snapshot(snapshot_id)).status.state == "Creating":
        assert asyncio.get_running_loop().time() < deadline, f"snapshot {snapshot_id} still Creating"
        await asyncio.sleep(0.25)
    return info


PREPARE = """
set -e
mkdir -p /workspace/project/src /opt/tool
echo 'print("hello")' > /workspace/project/src/main.py
printf '#!/bin/sh\\necho tool-ran\\n' > /opt/tool/run && chmod 0750 /opt/tool/run
ln -s / /workspace/node-root
ln -s /etc/shadow /workspace/shadow-link
rm /etc/debian_version
mkfifo /workspace/fifo
touch /etc/.wh.os-release  # a name the layer format reads as a whiteout of the image's file
echo done
"""
CHECK = """
cat /workspace/project/src/main.py; /opt/tool/run; stat -c '%a' /opt/tool/run
readlink /workspace/node-root; readlink /workspace/shadow-link; test -e /etc/debian_version || echo no-file
test -p /workspace/fifo && echo fifo; echo "FROM_SNAPSHOT=$FROM_SNAPSHOT"; test -s /etc/os-release && echo os-release
"""


async def test_a_sandbox_from_a_kubernetes_snapshot_sees_its_files(
    server: KubernetesServer, kube: Client, namespace: str, base_image: str
) -> None:
    manager = await SandboxManager.create(sdk(server))
    async with sandbox(server, base_image, env={"FROM_SNAPSHOT": "kept"}, entrypoint=["sleep", "infinity"]) as source:
        assert (await run(source, PREPARE)).strip() == "done"
        snapshot = await source.create_snapshot(name="checkpoint")
        assert snapshot.status.state == "Creating" and snapshot.sandbox_id == source.id
        info = await settled(manager, snapshot.id)
        assert info.status.state == "Ready", info.status
        assert info.status.reason == "snapshot_ready" and info.name == "checkpoint"
        assert "left out 1 " in (info.status.message or ""), info.status  # the .wh. name
        # the committer pod goes, the record is a ConfigMap, the source goes on (thawed)
        no_committer(kube, namespace)
        record = kube.get(ConfigMap, snapshot.id, namespace=namespace)
        image = json.loads(record.data["record"])["image"]
        assert image.startswith(f"{base_image.split('/', 1)[0]}/osb-tests/snapshots@sha256:")
        await run(source, "echo after > /workspace/after-snapshot")

        listed = await manager.list_snapshots(SnapshotFilter())
        assert snapshot.id in {s.id for s in listed.snapshot_infos}

        restored = await Sandbox.create(snapshot_id=snapshot.id, connection_config=sdk(server), resource=SMALL)
        try:
            got = await run(restored, CHECK)
            assert got.split("\n") == [
                'print("hello")', "tool-ran", "750", "/", "/etc/shadow", "no-file", "fifo", "FROM_SNAPSHOT=kept",
                "os-release",
            ]  # fmt: skip
            assert "after-snapshot" not in await run(restored, "ls /workspace")
            # the link to / resolves inside the new sandbox: its own root, not the node's
            assert "node-root" in await run(restored, "ls /workspace/node-root/workspace")
            bsbx = kube.get(BatchSandbox, restored.id, namespace=namespace)
            assert bsbx.metadata.labels[labels.RESTORED_FROM] == snapshot.id
            # in use: refused, not deferred
            with pytest.raises(SandboxApiException) as in_use:
                await manager.delete_snapshot(snapshot.id)
            assert in_use.value.status_code == 409 and in_use.value.error.code == "SNAPSHOT::IN_USE"
        finally:
            await restored.kill()
            await restored.close()
        await _eventually_deleted(manager, snapshot.id)
        with pytest.raises(SandboxApiException) as missing:
            await manager.get_snapshot(snapshot.id)
        assert missing.value.status_code == 404


async def test_a_200_mib_workspace(server: KubernetesServer, base_image: str) -> None:
    manager = await SandboxManager.create(sdk(server))
    write = "mkdir -p /workspace && head -c 209715200 /dev/urandom > /workspace/big"
    checksum = "sha256sum /workspace/big | cut -d' ' -f1"
    async with sandbox(server, base_image, entrypoint=["sleep", "infinity"]) as source:
        digest = await run(source, f"{write} && {checksum}")
        info = await settled(manager, (await source.create_snapshot()).id)
        assert info.status.state == "Ready", info.status
        assert "209715200 bytes" in (info.status.message or ""), info.status
    restored = await Sandbox.create(snapshot_id=info.id, connection_config=sdk(server), resource=SMALL)
    try:
        assert await run(restored, checksum) == digest
    finally:
        await restored.kill()
        await restored.close()
    await _eventually_deleted(manager, info.id)


async def _eventually_deleted(manager: SandboxManager, snapshot_id: str) -> None:
    """The restored sandbox's BatchSandbox leaves the server's cache on the watch's delete event."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await manager.delete_snapshot(snapshot_id)
            return
        except SandboxApiException as exc:
            if exc.status_code != 409 or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.2)


async def test_a_huge_sparse_file_fails_the_snapshot_and_harms_nothing(
    server: KubernetesServer, kube: Client, namespace: str, base_image: str, registry: Registry
) -> None:
    """A 64 GiB sparse file over a bound of 256 MiB: refused before a byte is read (Failed, with the
    reason), the sandbox goes on (thawed), the committer pod is gone, the registry got nothing."""
    manager = await SandboxManager.create(sdk(server))
    async with sandbox(server, base_image, entrypoint=["sleep", "infinity"]) as source:
        await run(source, "mkdir -p /workspace && truncate -s 64G /workspace/huge && ln -s / /workspace/root")
        snapshot = await source.create_snapshot()
        info = await settled(manager, snapshot.id)
        assert info.status.state == "Failed", info.status
        assert info.status.reason == "snapshot_too_large", info.status
        assert f"{BOUND_MIB} MiB" in (info.status.message or "")
        assert await run(source, "echo still-running") == "still-running"
        no_committer(kube, namespace)
        assert snapshot.id not in pushed_tags(registry)  # nothing was pushed
        with pytest.raises(SandboxApiException) as refused:
            await Sandbox.create(snapshot_id=snapshot.id, connection_config=sdk(server), resource=SMALL)
        assert refused.value.status_code == 409 and refused.value.error.code == "SNAPSHOT::INVALID_STATE"
        await manager.delete_snapshot(snapshot.id)  # a Failed one can be deleted


async def test_snapshots_go_to_a_registry_that_wants_credentials(
    cluster: LocalCluster,
    kube: Client,
    namespace: str,
    execd_controller: ControllerProcess,
    committer_image: str,
    base_image: str,
    tmp_path: Path,
) -> None:
    """kubernetes.snapshotRegistrySecret: the committer pushes with its credentials (htpasswd), the
    restored pod pulls with it, the server deletes the image with it; a wrong password fails the
    snapshot with the registry's refusal and leaves the sandbox running."""
    with private_registry("snapshot-auth", AUTH_PORT, CREDENTIALS) as private:
        secret = "snapshot-registry"
        apply = ("apply", "-n", namespace, "-f", "-")
        cluster.kubectl(*apply, input=json.dumps(private.pull_secret(secret, CREDENTIALS)))
        config = snapshot_server_config(private, committer_image, registry_secret=secret)
        with kubernetes_server(tmp_path, namespace, cluster.kubeconfig, config) as server:
            manager = await SandboxManager.create(sdk(server))
            async with sandbox(server, base_image, entrypoint=["sleep", "infinity"]) as source:
                await run(source, "mkdir -p /workspace && echo behind-a-password > /workspace/kept")
                snapshot = await source.create_snapshot()
                info = await settled(manager, snapshot.id)
                assert info.status.state == "Ready", info.status
                image = json.loads(kube.get(ConfigMap, snapshot.id, namespace=namespace).data["record"])["image"]
                assert image.startswith(f"{private.address}/osb-tests/snapshots@sha256:")
                with private.client(("nobody", "nothing")) as anonymous:
                    assert anonymous.get("/v2/osb-tests/snapshots/tags/list").status_code == 401

                restored = await Sandbox.create(snapshot_id=snapshot.id, connection_config=sdk(server), resource=SMALL)
                try:
                    assert await run(restored, "cat /workspace/kept") == "behind-a-password"
                finally:
                    await restored.kill()
                    await restored.close()
                await _eventually_deleted(manager, snapshot.id)
                digest = image.split("@", 1)[1]
                with private.client() as client:
                    assert client.get(f"/v2/osb-tests/snapshots/manifests/{digest}").status_code == 404

                wrong = private.pull_secret(secret, (CREDENTIALS[0], "wrong-password"))
                cluster.kubectl(*apply, input=json.dumps(wrong))
                refused = await settled(manager, (await source.create_snapshot()).id)
                assert refused.status.state == "Failed", refused.status
                message = (refused.status.message or "").lower()
                assert "refused" in message and ("401" in message or "unauthorized" in message), refused.status
                assert await run(source, "echo still-running") == "still-running"
                no_committer(kube, namespace)


def host_freezer(container_id: str) -> tuple[Path, str]:
    """The container's freezer file on this host (the real node's) and the value that means frozen."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        if container_id in cgroup:
            relative, frozen, _ = committer.freezer_file(cgroup)
            return Path("/sys/fs/cgroup", relative), frozen
    raise AssertionError(f"no process of container {container_id} on this host")


def kill_the_committer_while_frozen(freezer: Path, frozen: str, timeout: float = 120) -> None:
    """SIGKILL every committer process the moment the sandbox reads frozen: its own thaw never runs."""
    deadline = time.monotonic() + timeout
    while freezer.read_text().strip() != frozen:
        assert time.monotonic() < deadline, "the sandbox was never frozen"
        time.sleep(0.002)
    pids = subprocess.run(["pgrep", "-f", "commit-snapshot"], capture_output=True, text=True).stdout.split()
    assert pids, "no committer process while the sandbox was frozen"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


async def test_a_committer_killed_while_the_sandbox_is_frozen_leaves_it_thawed(
    server: KubernetesServer, kube: Client, namespace: str, base_image: str
) -> None:
    """SIGKILL (its memory limit, node pressure) skips the committer's own thaw: the server's thaw-only
    pod on the node thaws the sandbox, and the Failed snapshot says so."""
    manager = await SandboxManager.create(sdk(server))
    async with sandbox(server, base_image, entrypoint=["sleep", "infinity"]) as source:
        # 200 MiB to read while frozen: a capture long enough to be caught in
        await run(source, "mkdir -p /workspace && head -c 209715200 /dev/urandom > /workspace/big")
        (pod,) = sandbox_pods(kube, namespace, source.id)
        (status_,) = [c for c in pod.status.containerStatuses if c.name == labels.SANDBOX_CONTAINER]
        freezer, frozen = host_freezer(status_.containerID.split("://", 1)[1])
        snapshot = await source.create_snapshot()
        await asyncio.to_thread(kill_the_committer_while_frozen, freezer, frozen)
        info = await settled(manager, snapshot.id)
        assert info.status.state == "Failed", info.status
        assert "the sandbox was thawed" in (info.status.message or ""), info.status
        assert freezer.read_text().strip() != frozen
        assert await run(source, "echo thawed") == "thawed"
        eventually(
            lambda: (
                not [p for p in kube.list(Pod, namespace=namespace) if p.metadata.name.endswith(("-commit", "-thaw"))]
            ),
            timeout=30,
            what="the committer and thaw pods deleted",
        )


def sandbox_pods(kube: Client, namespace: str, sandbox_id: str) -> list[Pod]:
    return list(kube.list(Pod, namespace=namespace, labels={labels.BATCHSANDBOX: sandbox_id}))


async def state_becomes(manager: SandboxManager, sandbox_id: str, state: str, timeout: float = 180) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (info := await manager.get_sandbox_info(sandbox_id)).status.state != state:
        assert info.status.state in ("Running", "Pausing", "Paused"), info.status
        assert asyncio.get_running_loop().time() < deadline, f"{sandbox_id} is {info.status}, not {state}"
        await asyncio.sleep(0.25)


async def snapshots_become(manager: SandboxManager, check: Callable[[set[str]], bool], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check(ids := {s.id for s in (await manager.list_snapshots(SnapshotFilter())).snapshot_infos}):
        assert asyncio.get_running_loop().time() < deadline, f"snapshots now: {sorted(ids)}"
        await asyncio.sleep(0.25)


async def test_pause_frees_the_node_resume_brings_the_files_back_expiry_cleans_up(
    server: KubernetesServer, kube: Client, namespace: str, cluster: LocalCluster, base_image: str
) -> None:
    """Pause: a snapshot, then the pod goes and the BatchSandbox stays (Paused in kubectl); resume: a new
    pod from the snapshot image, same id, commands and files work (SDK resume and connect). A second
    pause replaces the first's snapshot; expiry while paused deletes the BatchSandbox and the snapshot."""
    manager = await SandboxManager.create(sdk(server))
    async with sandbox(server, base_image, entrypoint=["sleep", "infinity"]) as sb:
        await run(sb, "mkdir -p /workspace/w && echo kept > /workspace/w/kept.txt && rm /etc/debian_version")
        (before,) = sandbox_pods(kube, namespace, sb.id)
        await sb.pause()
        await state_becomes(manager, sb.id, "Paused")
        eventually(lambda: not sandbox_pods(kube, namespace, sb.id), timeout=60, what="the paused sandbox's pod gone")
        eventually(
            lambda: status(kube.get(BatchSandbox, sb.id, namespace=namespace)).get("phase") == "Paused",
            timeout=30,
            what="the BatchSandbox Paused",
        )
        listed = cluster.kubectl("get", "bsbx", "-n", namespace, sb.id, "--no-headers")
        assert "Paused" in listed and " 0 " in listed, listed
        # bad input while paused: 4xx with {code, message}
        for call, status_code, code in (
            (sb.create_snapshot, 409, "SNAPSHOT::INVALID_SOURCE_STATE"),
            (lambda: sb.get_endpoint(44772), 409, "UNEXPECTED_RESPONSE"),  # the SDK's code for its 409
            (lambda: manager.get_snapshot("snap-nope"), 404, "SNAPSHOT::NOT_FOUND"),
            (
                lambda: Sandbox.create(snapshot_id="snap-nope", connection_config=sdk(server)),
                400,
                "SANDBOX::INVALID_PARAMETER",
            ),
        ):
            with pytest.raises(SandboxApiException) as refused:
                await call()
            assert (refused.value.status_code, refused.value.error.code) == (status_code, code), refused.value

        resumed = await Sandbox.resume(sb.id, connection_config=sdk(server), resume_timeout=dt.timedelta(seconds=120))
        try:
            assert (await manager.get_sandbox_info(sb.id)).status.state == "Running"  # endpoints only then
            assert await run(resumed, "cat /workspace/w/kept.txt; test -e /etc/debian_version || echo no-file") == (
                "kept\nno-file"
            )
            (after,) = sandbox_pods(kube, namespace, sb.id)
            assert after.metadata.uid != before.metadata.uid and after.spec.containers[-1].image.count("@sha256:")
            connected = await Sandbox.connect(sb.id, connection_config=sdk(server))
            assert await run(connected, "echo connected") == "connected"
            await connected.close()

            await run(resumed, "echo second > /workspace/w/second.txt")
            first = kube.get(BatchSandbox, sb.id, namespace=namespace).metadata.labels[labels.RESTORED_FROM]
            await resumed.pause()
            await state_becomes(manager, sb.id, "Paused")
            second = kube.get(BatchSandbox, sb.id, namespace=namespace).metadata.labels[labels.RESTORED_FROM]
            assert second != first
            await snapshots_become(manager, lambda ids: second in ids and first not in ids)  # the first is unused

            await resumed.renew(dt.timedelta(seconds=2))  # expiry keeps running while paused
            eventually(
                lambda: not list(kube.list(BatchSandbox, namespace=namespace)), timeout=60, what="expired and deleted"
            )
            await snapshots_become(manager, lambda ids: second not in ids)  # the paused sandbox's snapshot went too
        finally:
            await resumed.close()


def pool_uids(kube: Client, namespace: str, pool: str, idle_only: bool = False) -> set[str]:
    pods = pool_pods(kube, namespace, pool)
    return {p.metadata.uid for p in (idle_ready(pods) if idle_only else pods)}


async def test_a_pooled_sandbox_pauses_out_of_its_pool_and_resumes_into_a_fresh_pod_with_its_files(
    server: KubernetesServer, kube: Client, namespace: str, cluster: LocalCluster, base_image: str
) -> None:
    """Pause of a pooled sandbox: the same snapshot as direct mode, then its claimed pod is deleted (never
    back to the Pool) and its BatchSandbox leaves the Pool, Paused; the Pool's idle pods stay. Resume: a
    fresh pod from the snapshot image, not one of the Pool's, with the files (SDK resume and connect)."""
    pod_spec = real_node_pod_spec(
        image=base_image, imagePullPolicy="IfNotPresent", env=[{"name": "POOL_ENV", "value": "p"}]
    )
    manifest = pool_manifest("warm", pod_spec, minimum=1, maximum=1, capacity=3)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    eventually(lambda: pool_uids(kube, namespace, "warm", idle_only=True), timeout=120, what="a warm pod")
    manager = await SandboxManager.create(sdk(server))
    async with sandbox(server, base_image, extensions={"poolRef": "warm"}, env={"MINE": "m"}) as sb:
        (claimed,) = sandbox_pods(kube, namespace, sb.id)
        assert claimed.metadata.labels[labels.POOL] == "warm"
        await run(sb, "mkdir -p /workspace/w && echo pooled > /workspace/w/kept.txt")
        idle = eventually(lambda: pool_uids(kube, namespace, "warm", idle_only=True), timeout=120, what="refilled")

        await sb.pause()
        await state_becomes(manager, sb.id, "Paused")
        eventually(lambda: gone(kube, Pod, claimed.metadata.name, namespace), timeout=60, what="the claimed pod gone")
        eventually(
            lambda: status(kube.get(BatchSandbox, sb.id, namespace=namespace)).get("phase") == "Paused",
            timeout=30,
            what="the BatchSandbox Paused",
        )
        paused = kube.get(BatchSandbox, sb.id, namespace=namespace)
        assert (
            "poolRef" not in paused.spec
            and "@sha256:" in paused.spec["sandboxTemplate"]["spec"]["containers"][0]["image"]
        )
        assert pool_uids(kube, namespace, "warm") == idle, (
            "the Pool's idle pods are untouched, the claimed one not back"
        )
        eventually(
            lambda: status(kube.get(Pool, "warm", namespace=namespace)).get("allocated") == 0,
            timeout=30,
            what="the Pool no longer counts the paused sandbox's pod",
        )

        resumed = await Sandbox.resume(sb.id, connection_config=sdk(server), resume_timeout=dt.timedelta(seconds=120))
        try:
            assert await run(resumed, "cat /workspace/w/kept.txt; echo $POOL_ENV $MINE") == "pooled\np m"
            (after,) = sandbox_pods(kube, namespace, sb.id)
            assert after.metadata.name == f"{sb.id}-0" and labels.POOL not in after.metadata.labels
            assert after.metadata.uid not in pool_uids(kube, namespace, "warm") | {claimed.metadata.uid}
            assert pool_uids(kube, namespace, "warm", idle_only=True) == idle, "the warm pod stays the Pool's"
            connected = await Sandbox.connect(sb.id, connection_config=sdk(server))
            assert await run(connected, "cat /workspace/w/kept.txt") == "pooled"
            await connected.close()
        finally:
            await resumed.close()

        # A pooled sandbox whose Pool is gone has no template to resume from: refused before a snapshot.
        async with sandbox(server, base_image, extensions={"poolRef": "warm"}) as orphan:
            cluster.kubectl("delete", "sbxpool", "warm", "-n", namespace)
            with pytest.raises(SandboxApiException) as refused:
                await orphan.pause()
            assert (refused.value.status_code, refused.value.error.code) == (409, "SANDBOX::INVALID_STATE")
            assert "Pool 'warm' is gone" in str(refused.value.error.message)
            assert (await manager.get_sandbox_info(orphan.id)).status.state == "Running"
