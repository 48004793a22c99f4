"""Invalid Pools and BatchSandboxes are rejected by the API server with a message a person understands."""

from __future__ import annotations

import pytest

from harness.kube import pooled_batchsandbox, seed_pool
from harness.services import LocalCluster


def rejected(cluster: LocalCluster, namespace: str, manifest: str) -> str:
    with pytest.raises(RuntimeError) as info:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    return str(info.value)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (seed_pool(min_buffer=6, max_buffer=5, capacity=10), "minBufferSize must not exceed maxBufferSize"),
        (seed_pool(min_buffer=2, max_buffer=11, capacity=10), "maxBufferSize must not exceed capacity"),
        (seed_pool(min_buffer=-1, max_buffer=5, capacity=10), "spec.minBufferSize: Invalid value: -1"),
        (seed_pool().replace("      image: ubuntu:latest\n", ""), "sandboxTemplate.spec needs an image"),
        (pooled_batchsandbox("b", "p", -1), "spec.replicas: Invalid value: -1"),
        (pooled_batchsandbox("b", "p").replace("  poolRef: p\n", ""), "sandboxTemplate is required unless poolRef"),
        (
            pooled_batchsandbox("b", "p").replace("poolRef: p", "poolRef: p\n  ttlSecondsAfterFinished: -5"),
            "ttlSecondsAfterFinished: Invalid value: -5",
        ),
        (pooled_batchsandbox("b", "p").replace("poolRef: p", "poolRef: p\n  expireTime: tomorrow"), "expireTime"),
        (
            "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata: {name: b}\n"
            "spec: {sandboxTemplate: {spec: {command: [sleep]}}}",
            "sandboxTemplate.spec needs an image (or containers) unless poolRef is set",
        ),
        (
            seed_pool() + "  updateStrategy: {maxUnavailable: lots}\n",
            "maxUnavailable is a number of pods or a percentage such as 25%",
        ),
        (
            pooled_batchsandbox("b", "p") + "  taskResourcePolicyWhenCompleted: Sometimes\n",
            'supported values: "Retain", "Release"',
        ),
    ],
    ids=[
        "min>max",
        "max>capacity",
        "negative-min",
        "no-image",
        "negative-replicas",
        "no-template",
        "negative-ttl",
        "bad-expire",
        "direct-without-image",
        "bad-max-unavailable",
        "bad-release-policy",
    ],
)
def test_invalid_objects_are_rejected(
    cluster: LocalCluster, crds: None, namespace: str, manifest: str, message: str
) -> None:
    assert message in rejected(cluster, namespace, manifest)


def test_pool_ref_is_immutable_except_that_it_can_be_removed_with_replicas_0(
    cluster: LocalCluster, crds: None, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("b", "pool-a"))
    assert "poolRef is immutable" in rejected(cluster, namespace, pooled_batchsandbox("b", "pool-b"))
    removed = pooled_batchsandbox("b", "pool-a").replace(
        "  poolRef: pool-a\n", "  sandboxTemplate: {spec: {image: ubuntu}}\n"
    )
    with pytest.raises(RuntimeError, match="poolRef is immutable: it can only be removed, together with replicas 0"):
        cluster.kubectl("replace", "-n", namespace, "-f", "-", input=removed)
    # Other fields still change.
    cluster.kubectl("patch", "bsbx", "b", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}')

    def patch(body: str) -> None:
        cluster.kubectl("patch", "bsbx", "b", "-n", namespace, "--type=merge", "-p", body)

    # Leaving the Pool (the server's pause of a pooled sandbox) needs a template with an image.
    with pytest.raises(RuntimeError, match=r"sandboxTemplate\.spec needs an image"):
        patch('{"spec":{"replicas":0,"poolRef":null,"sandboxTemplate":{"spec":{"command":["x"]}}}}')
    patch('{"spec":{"replicas":0,"poolRef":null,"sandboxTemplate":{"spec":{"image":"ubuntu"}}}}')
    patch('{"spec":{"replicas":1}}')  # a direct BatchSandbox from then on
    with pytest.raises(RuntimeError, match="poolRef is immutable"):
        patch('{"spec":{"replicas":0,"poolRef":"pool-a"}}')  # and it never joins a Pool again


def test_defaults_are_applied(cluster: LocalCluster, crds: None, namespace: str) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("b", "p").replace("  replicas: 1\n", "")
    )
    assert cluster.kubectl("get", "bsbx", "b", "-n", namespace, "-o", "jsonpath={.spec.replicas}") == "1"
    manifest = seed_pool().replace("  minBufferSize: 2\n", "")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    got = cluster.kubectl(
        "get",
        "sbxpool",
        "example-pool",
        "-n",
        namespace,
        "-o",
        "jsonpath={.spec.minBufferSize} {.spec.recycleStrategy}",
    )
    assert got == "0 Delete"
    for ok in ("3", "25%"):
        cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=seed_pool() + f"  scaleStrategy: {{maxUnavailable: {ok}}}\n"
        )
