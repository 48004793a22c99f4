"""Volumes on the kubernetes runtime, through the official SDK, on the real node (on unless OSB_REAL_NODE=0).

`pvc`: the server makes the PersistentVolumeClaim (storageClass, storage, accessModes as asked) and the
cluster's PersistentVolume controller binds it to a PV the test made beforehand (a hostPath PV of a
class of its own: the test cluster has no dynamic provisioner); the data outlives the sandbox and the
next sandbox reads it; deleteOnSandboxTermination makes the claim the BatchSandbox's, deleted with it.
`host`: a directory of the node (this machine) under server.allowedHostPaths; a symlink a sandbox
planted below the allowed root never leads out of it (the kubelet's subPath checks refuse it).
Pooled creates may name only volumes their Pool's pods mount already (a warm pod's mounts are its own).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import PersistentVolume, PersistentVolumeClaim
from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import PVC, Host, Volume

from harness.controller_process import ControllerProcess
from harness.images import TEST_IMAGE
from harness.kube import BatchSandbox, eventually, gone, idle_ready, pool_manifest, pool_pods
from harness.kubernetes_server import SMALL, KubernetesServer, kubernetes_server, real_node_server_config
from harness.real_node import RealNode, real_node_pod_spec
from harness.services import LocalCluster
from tests.integration.test_server_kubernetes_real_node import sdk_config, stdout_of


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir(mode=0o755)
    return root


@pytest.fixture
def server(
    cluster: LocalCluster, namespace: str, execd_controller: ControllerProcess, tmp_path: Path, allowed: Path
) -> Iterator[KubernetesServer]:
    with kubernetes_server(
        tmp_path / "server",
        namespace,
        cluster.kubeconfig,
        real_node_server_config(),
        server_config=f'allowedHostPaths = ["{allowed}"]',
    ) as srv:
        yield srv


@pytest.fixture
def storage_class(cluster: LocalCluster, kube: Client, tmp_path: Path, namespace: str) -> Iterator[str]:
    """A class name of this test's own with two hostPath PVs of it (no StorageClass object: the PV
    controller binds a claim of that class to one of them statically)."""
    name = f"osb-test-{namespace}"
    volumes = []
    for index in range(2):
        path = tmp_path / f"pv-{index}"
        path.mkdir()
        volumes.append(f"{name}-{index}")
        pv: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volumes[-1], "labels": {"opensandbox.io/test": "true"}},
            "spec": {
                "storageClassName": name,
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pv))
    yield name
    for volume in volumes:
        with contextlib.suppress(Exception):
            kube.delete(PersistentVolume, volume)


@contextlib.asynccontextmanager
async def created(server: KubernetesServer, volumes: list[Volume], **create: Any) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(
        TEST_IMAGE, connection_config=sdk_config(server), resource=SMALL, entrypoint=["sleep", "infinity"],
        volumes=volumes, **create,
    )  # fmt: skip
    try:
        yield sb
    finally:
        with contextlib.suppress(SandboxApiException):
            await sb.kill()
        await sb.close()


async def test_a_claim_made_by_a_create_outlives_it_and_the_next_sandbox_reads_it(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode, storage_class: str
) -> None:
    claim = PVC(claim_name="work", storage_class=storage_class, storage="64Mi", access_modes=["ReadWriteOnce"])
    async with created(server, [Volume(name="work", mount_path="/work", pvc=claim)]) as first:
        assert await stdout_of(first, "echo kept > /work/f && mkdir /work/sub && echo in-sub > /work/sub/g && echo ok")
        made = kube.get(PersistentVolumeClaim, "work", namespace=namespace)
        assert made.spec.storageClassName == storage_class and made.spec.resources.requests["storage"] == "64Mi"
        assert made.status.phase == "Bound" and made.spec.volumeName.startswith(storage_class)
        assert not made.metadata.ownerReferences  # not deleteOnSandboxTermination: it stays
    eventually(lambda: not list(kube.list(BatchSandbox, namespace=namespace)), timeout=60, what="the first gone")

    again = PVC(claim_name="work", create_if_not_exists=False)
    volumes = [
        Volume(name="all", mount_path="/all", pvc=again, read_only=True),
        Volume(name="sub", mount_path="/sub", pvc=again, sub_path="sub"),
    ]
    async with created(server, volumes) as second:
        assert await stdout_of(second, "cat /all/f /sub/g") == "kept\nin-sub"
        assert "Read-only" in await stdout_of(second, "touch /all/x 2>&1; true")


async def test_delete_on_termination_gives_the_claim_to_the_sandbox(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode, storage_class: str
) -> None:
    claim = PVC(claim_name="scratch", storage_class=storage_class, delete_on_sandbox_termination=True)
    async with created(server, [Volume(name="s", mount_path="/scratch", pvc=claim)]) as sb:
        assert await stdout_of(sb, "echo x > /scratch/f && echo ok") == "ok"
        (owner,) = kube.get(PersistentVolumeClaim, "scratch", namespace=namespace).metadata.ownerReferences
        assert (owner.kind, owner.name) == ("BatchSandbox", sb.id)
    eventually(lambda: gone(kube, PersistentVolumeClaim, "scratch", namespace), timeout=90, what="the claim deleted")


async def test_a_host_directory_under_the_allowed_root_is_shared_and_symlinks_do_not_lead_out(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode, allowed: Path
) -> None:
    shared = allowed / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("hello\n")
    async with created(server, [Volume(name="h", mount_path="/h", host=Host(path=str(shared)))]) as sb:
        assert await stdout_of(sb, "cat /h/from-host; echo written > /h/from-pod; ln -s /etc /h/out; echo ok")
    assert (shared / "from-pod").read_text() == "written\n"

    # The sandbox's symlink (and one to / next to it) asked for as a host path, or as a subPath of one:
    # the kubelet refuses the subPath that leads out, the create fails and leaves nothing.
    (allowed / "root").symlink_to("/")
    attempts = [
        Volume(name="x", mount_path="/x", host=Host(path=str(shared / "out"))),
        Volume(name="x", mount_path="/x", host=Host(path=str(allowed / "root"))),
        Volume(name="x", mount_path="/x", host=Host(path=str(shared)), sub_path="out"),
    ]
    for volume in attempts:
        with pytest.raises(SandboxApiException) as refused:
            async with created(server, [volume]):
                pass
        assert refused.value.status_code == 400, refused.value
        assert refused.value.error.code == "SANDBOX::START_FAILED", refused.value.error
        eventually(lambda: not list(kube.list(BatchSandbox, namespace=namespace)), timeout=60, what="nothing left")


async def test_bad_volumes_are_refused_before_anything_is_made(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode, tmp_path: Path
) -> None:
    cases = [
        (
            Volume(name="m", mount_path="/m", pvc=PVC(claim_name="missing", create_if_not_exists=False)),
            "does not exist",
        ),
        (Volume(name="o", mount_path="/o", host=Host(path=str(tmp_path))), "not under an allowed host path"),
    ]
    for volume, words in cases:
        with pytest.raises(SandboxApiException) as refused:
            async with created(server, [volume]):
                pass
        assert refused.value.status_code == 400 and words in str(refused.value.error.message), refused.value.error
    assert list(kube.list(BatchSandbox, namespace=namespace)) == []
    assert list(kube.list(PersistentVolumeClaim, namespace=namespace)) == []


async def test_a_pooled_create_names_the_volumes_its_pool_mounts(
    server: KubernetesServer, cluster: LocalCluster, kube: Client, namespace: str, allowed: Path
) -> None:
    # A warm pod's mounts are made with it: the Pool mounts a directory of the node; a pooled create
    # may name that volume (its data is there), and nothing else.
    shared = allowed / "shared"
    shared.mkdir()
    (shared / "seed").write_text("from the pool\n")
    pod_spec = real_node_pod_spec(volumeMounts=[{"name": "data", "mountPath": "/data"}])
    pod_spec["volumes"] = [{"name": "data", "hostPath": {"path": str(shared), "type": "Directory"}}]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool_manifest("mounts", pod_spec, 1, 1, 3)))
    eventually(lambda: idle_ready(pool_pods(kube, namespace, "mounts")), timeout=120, what="a Ready pod of the Pool")
    pooled = {"extensions": {"poolRef": "mounts"}}
    same = Volume(name="data", mount_path="/data", host=Host(path=str(shared)))
    async with created(server, [same], **pooled) as sb:
        assert await stdout_of(sb, "cat /data/seed") == "from the pool"
    for other in (
        Volume(name="elsewhere", mount_path="/elsewhere", host=Host(path=str(shared))),
        Volume(name="data", mount_path="/data", host=Host(path=str(shared)), read_only=True),
        Volume(name="w", mount_path="/w", pvc=PVC(claim_name=f"c-{uuid.uuid4().hex[:6]}")),
    ):
        with pytest.raises(SandboxApiException) as refused:
            async with created(server, [other], **pooled):
                pass
        error = refused.value.error
        assert error.code == "SANDBOX::API_NOT_SUPPORTED" and f"does not mount {other.name}" in str(error.message)
    eventually(lambda: not list(kube.list(BatchSandbox, namespace=namespace)), timeout=30, what="no BatchSandbox left")
    assert list(kube.list(PersistentVolumeClaim, namespace=namespace)) == []
