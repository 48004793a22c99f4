"""The kubernetes runtime's mapping between create requests, BatchSandboxes and the API's sandboxes."""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import replace
from typing import Any

import pytest

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import BatchSandboxSpec
from opensandbox_platform.controller.pods import build_pod
from opensandbox_platform.controller.status import bootstrap_request
from opensandbox_platform.server.config import ConfigError, load
from opensandbox_platform.server.runtimes.base import SandboxSpec
from opensandbox_platform.server.runtimes.kubernetes_objects import (
    DOCKER_HUB_AUTH_KEY,
    KEEP_ALIVE_ENTRYPOINT,
    RESUME_PATCH,
    Settings,
    build_batchsandbox,
    claim_manifest,
    left_pool_patch,
    left_pool_template,
    new_sandbox_id,
    paused_patch,
    pool_mounts,
    pull_secret_manifest,
    read_entry,
    registry_of,
    volumes_not_in_pool,
)
from opensandbox_platform.server.volumes import PvcBackend
from opensandbox_platform.server.volumes import parse as parse_volumes

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
PLACEMENT = {"nodeSelector": {"opensandbox.io/node": "real"}, "tolerations": [{"operator": "Exists"}]}


def spec(**overrides: Any) -> SandboxSpec:
    values: dict[str, Any] = {
        "image": "localhost/app:1",
        "entrypoint": ["python3", "app.py"],
        "env": {"A": "1"},
        "metadata": {"team": "a"},
        "timeout_seconds": 600,
        "cpu_millis": 500,
        "memory_bytes": 256 << 20,
    }
    values.update(overrides)
    return SandboxSpec(**values)


def as_cluster_returns(obj: dict[str, Any], status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    obj["metadata"].update({"namespace": "ns", "uid": "u1", "resourceVersion": "7", **meta})
    if status is not None:
        obj["status"] = status
    return obj


def test_direct_mode_carries_image_entrypoint_env_limits_and_the_configured_pod_defaults() -> None:
    obj = build_batchsandbox("id-1", spec(), Settings("Never", PLACEMENT), NOW)
    assert obj["metadata"]["name"] == "id-1"
    assert obj["metadata"]["labels"] == {"team": "a", labels.CREATED_BY: labels.CREATED_BY_SERVER}
    body = obj["spec"]
    assert body["replicas"] == 1 and "poolRef" not in body
    assert body["expireTime"] == "2026-01-02T03:14:05.678901Z"
    pod = body["sandboxTemplate"]["spec"]
    assert pod["nodeSelector"] == PLACEMENT["nodeSelector"] and pod["tolerations"] == PLACEMENT["tolerations"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["containers"] == [
        {
            "name": "sandbox",
            "image": "localhost/app:1",
            "imagePullPolicy": "Never",
            "command": ["python3", "app.py"],
            "env": [{"name": "A", "value": "1"}],
            "resources": {"limits": {"cpu": "500m", "memory": str(256 << 20)}},
        }
    ]
    BatchSandboxSpec.model_validate(body)  # what the CRD's model accepts


@pytest.mark.parametrize(
    ("overrides", "resources"),
    [
        (
            {"cpu_request_millis": 250, "memory_request_bytes": 128 << 20},
            {
                "limits": {"cpu": "500m", "memory": str(256 << 20)},
                "requests": {"cpu": "250m", "memory": str(128 << 20)},
            },
        ),
        (
            {"cpu_millis": None, "memory_bytes": None, "cpu_request_millis": 100},
            {"requests": {"cpu": "100m"}},
        ),
        ({"cpu_millis": None, "memory_bytes": None}, None),
    ],
)
def test_direct_mode_carries_resource_requests_next_to_the_limits(
    overrides: dict[str, Any], resources: dict[str, Any] | None
) -> None:
    obj = build_batchsandbox("id", spec(**overrides), Settings(), NOW)
    (container,) = obj["spec"]["sandboxTemplate"]["spec"]["containers"]
    assert container.get("resources") == resources
    BatchSandboxSpec.model_validate(obj["spec"])


def test_lifecycle_hooks_hold_the_entrypoint_at_the_start_gate() -> None:
    hooks = {"preStart": {"command": ["true"], "timeoutSeconds": 60}}
    (with_hooks,) = build_batchsandbox("id-1", spec(lifecycle=hooks), Settings(), NOW)["spec"]["sandboxTemplate"][
        "spec"
    ]["containers"]
    assert {"name": labels.START_GATE_ENV, "value": labels.START_GATE} in with_hooks["env"]
    (plain,) = build_batchsandbox("id-1", spec(), Settings(), NOW)["spec"]["sandboxTemplate"]["spec"]["containers"]
    assert plain["env"] == [{"name": "A", "value": "1"}]


def test_reserved_labels_are_not_metadata() -> None:
    obj = build_batchsandbox("id", spec(), Settings(), NOW)
    obj["metadata"]["labels"].update({labels.DOCKER_PREFIX + "x": "y", "example.com/x": "z"})
    assert read_entry(as_cluster_returns(obj)).info.metadata == {"team": "a", "example.com/x": "z"}


def test_configured_pod_defaults_are_copied_not_shared() -> None:
    settings = Settings(default_pod_spec=PLACEMENT)
    pod = build_batchsandbox("id", spec(), settings, NOW)["spec"]["sandboxTemplate"]["spec"]
    pod["nodeSelector"]["changed"] = "yes"
    assert "changed" not in PLACEMENT["nodeSelector"]


def test_pooled_mode_carries_only_entrypoint_and_env_for_the_controller_to_bootstrap() -> None:
    request = spec(extensions={"poolRef": "warm"}, timeout_seconds=None)
    obj = build_batchsandbox("id", request, Settings(default_pod_spec=PLACEMENT), NOW, pool_image="pool:img")
    body = obj["spec"]
    assert body["poolRef"] == "warm" and "expireTime" not in body
    assert body["sandboxTemplate"] == {"spec": {"command": ["python3", "app.py"], "env": [{"name": "A", "value": "1"}]}}
    assert bootstrap_request(BatchSandboxSpec.model_validate(body)) == {
        "env": {"A": "1"},
        "argv": ["python3", "app.py"],
    }
    info = read_entry(as_cluster_returns(obj)).info
    assert info.image == "pool:img" and info.entrypoint == ["python3", "app.py"]
    assert info.extensions == {"poolRef": "warm"}


def test_pooled_keep_alive_entrypoint_without_env_needs_no_template() -> None:
    request = spec(extensions={"poolRef": "warm"}, entrypoint=["tail", "-f", "/dev/null"], env={})
    body = build_batchsandbox("id", request, Settings(), NOW, pool_image="pool:img")["spec"]
    assert "sandboxTemplate" not in body
    assert bootstrap_request(BatchSandboxSpec.model_validate(body)) is None


def running_status(ip: str | None = "10.77.1.5") -> dict[str, Any]:
    return {
        "phase": "Running",
        "ready": 1,
        "sandboxes": [{"index": 0, "podName": "p", "podIP": ip, "ready": True}],
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "SandboxesReady",
                "message": "1/1 sandboxes Ready",
                "lastTransitionTime": "2026-01-02T03:04:07Z",
            }
        ],
    }


def condition_status(reason: str, message: str = "why") -> dict[str, Any]:
    cond = {"type": "Ready", "status": "False", "reason": reason, "message": message}
    return {"phase": "Pending", "conditions": [{**cond, "lastTransitionTime": "2026-01-02T03:04:06Z"}]}


@pytest.mark.parametrize(
    ("status", "meta", "state", "reason", "failure"),
    [
        (None, {}, "Pending", "CREATING", None),
        (running_status(), {}, "Running", "SANDBOX_READY", None),
        (running_status(ip=None), {}, "Pending", "CREATING", None),
        (condition_status("WaitingForPool"), {}, "Pending", "POOL_EXHAUSTED", None),
        (condition_status("SandboxesNotReady"), {}, "Pending", "POD_STARTING", None),
        (condition_status("FailedCreate", "forbidden"), {}, "Pending", "POD_CREATE_FAILED", "FailedCreate"),
        (
            condition_status("EgressPolicyFailed", "refused"),
            {},
            "Pending",
            "EGRESS_POLICY_FAILED",
            "EgressPolicyFailed",
        ),
        (condition_status("PoolWithoutEgress", "no"), {}, "Pending", "POOL_WITHOUT_EGRESS", "PoolWithoutEgress"),
        (condition_status("PoolNotFound"), {}, "Pending", "POOL_NOT_FOUND", "PoolNotFound"),
        ({**running_status(), "phase": "Succeeded"}, {}, "Terminated", "SANDBOX_EXITED", "EXITED"),
        ({**running_status(), "phase": "Failed"}, {}, "Failed", "SANDBOX_EXITED_ERROR", "EXITED"),
        (running_status(), {"deletionTimestamp": "2026-01-02T03:05:00Z"}, "Stopping", "DELETING", "DELETING"),
    ],
)
def test_state_from_the_batchsandbox_status(
    status: dict[str, Any] | None, meta: dict[str, Any], state: str, reason: str, failure: str | None
) -> None:
    obj = as_cluster_returns(build_batchsandbox("id", spec(), Settings(), NOW), status, **meta)
    entry = read_entry(obj)
    assert (entry.info.state, entry.info.reason) == (state, reason)
    assert (entry.failure[0] if entry.failure else None) == failure
    assert entry.running == (state == "Running")


def test_read_back_the_request_times_metadata_and_pod_ip() -> None:
    obj = as_cluster_returns(build_batchsandbox("id", spec(), Settings(), NOW), running_status())
    obj["metadata"]["labels"][labels.PREFIX + "other"] = "platform"
    entry = read_entry(obj)
    assert entry.key == "ns/id" and entry.pod_ip == "10.77.1.5"
    info = entry.info
    assert info.id == "id" and info.image == "localhost/app:1" and info.entrypoint == ["python3", "app.py"]
    assert info.metadata == {"team": "a"}
    assert info.created_at == NOW and info.expires_at == NOW + dt.timedelta(seconds=600)
    assert info.last_transition_at == dt.datetime(2026, 1, 2, 3, 4, 7, tzinfo=dt.UTC)


def test_newer_versions_win_by_resource_version() -> None:
    obj = as_cluster_returns(build_batchsandbox("id", spec(), Settings(), NOW))
    old = read_entry(obj)
    obj["metadata"]["resourceVersion"] = "12"
    new = read_entry(obj)
    assert new.newer_than(old) and not old.newer_than(new)


def test_ids_are_dns_safe_and_unique() -> None:
    ids = {new_sandbox_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 36 and i == i.lower() and i[0].isalnum() for i in ids)


def test_config_keys_of_the_kubernetes_runtime(tmp_path: Any) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        '[kubernetes]\nnamespace = "sbx"\nkubeconfig = "/k"\ncreateTimeoutSeconds = 5\nimagePullPolicy = "Never"\n'
        '[kubernetes.defaultPodSpec]\nnodeSelector = {"opensandbox.io/node" = "real"}\n'
        'tolerations = [{key = "opensandbox.io/real-node", operator = "Exists", effect = "NoSchedule"}]\n'
    )
    section = load(path).kubernetes
    assert (section.namespace, section.kubeconfig, section.create_timeout_seconds) == ("sbx", "/k", 5)
    assert section.default_pod_spec["nodeSelector"] == {"opensandbox.io/node": "real"}
    path.write_text('[kubernetes.defaultPodSpec]\ncontainers = [{name = "x"}]\n')
    with pytest.raises(ConfigError, match="must not set containers"):
        load(path)


# --- volumes and image pull secrets ----------------------------------------------------------------------
def test_host_volumes_mount_their_allowed_root_with_the_rest_as_subpath() -> None:
    volumes = parse_volumes(
        [
            {"name": "data", "mountPath": "/data", "host": {"path": "/srv/shared/team-a"}, "subPath": "x/y"},
            {"name": "root", "mountPath": "/root-of-all", "host": {"path": "/srv/shared"}, "readOnly": True},
            {"name": "c", "mountPath": "/cache", "pvc": {"claimName": "cache"}, "subPath": "s"},
        ],
        ["/srv", "/srv/shared/"],
        frozenset({"host", "pvc"}),
    )
    settings = Settings(allowed_host_paths=("/srv", "/srv/shared/"))
    pod = build_batchsandbox("id", spec(volumes=volumes), settings, NOW)["spec"]["sandboxTemplate"]["spec"]
    # The longest allowed root: a sandbox's symlink below it is the kubelet's subPath check's to refuse.
    # One pod volume per root or claim (the kubelet never mounts a second one of the same claim).
    assert pod["volumes"] == [
        {"name": "volume-0", "hostPath": {"path": "/srv/shared", "type": "Directory"}},
        {"name": "volume-1", "persistentVolumeClaim": {"claimName": "cache"}},
    ]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": "volume-0", "mountPath": "/data", "subPath": "team-a/x/y"},
        {"name": "volume-0", "mountPath": "/root-of-all", "readOnly": True},
        {"name": "volume-1", "mountPath": "/cache", "subPath": "s"},
    ]


def test_a_claim_mounted_only_read_only_is_a_read_only_pod_volume() -> None:
    volumes = parse_volumes(
        [
            {"name": "a", "mountPath": "/a", "pvc": {"claimName": "c"}, "readOnly": True},
            {"name": "b", "mountPath": "/b", "pvc": {"claimName": "c"}, "subPath": "s", "readOnly": True},
        ],
        [],
        frozenset({"pvc"}),
    )
    pod = build_batchsandbox("id", spec(volumes=volumes), Settings(), NOW)["spec"]["sandboxTemplate"]["spec"]
    assert pod["volumes"] == [{"name": "volume-0", "persistentVolumeClaim": {"claimName": "c", "readOnly": True}}]


def test_a_created_claim_carries_the_provisioning_hints() -> None:
    hinted = PvcBackend("cache", storage_class="fast", storage="5Gi", access_modes=("ReadWriteMany",))
    claim = claim_manifest("sb-1", hinted, "1Gi")
    assert claim["metadata"]["name"] == "cache"
    assert claim["metadata"]["annotations"] == {labels.CREATED_FOR_SANDBOX: "sb-1"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "fast",
    }
    plain = claim_manifest("sb-1", PvcBackend("cache"), "1Gi")["spec"]
    assert plain == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("10.77.0.1:5001/osb/private:1", "10.77.0.1:5001"),
        ("registry.example/app", "registry.example"),
        ("localhost/app:1", "localhost"),
        ("library/python:3.12", DOCKER_HUB_AUTH_KEY),
        ("python", DOCKER_HUB_AUTH_KEY),
    ],
)
def test_registry_of_an_image(image: str, registry: str) -> None:
    assert registry_of(image) == registry


def test_image_auth_is_a_pull_secret_of_the_sandbox_referenced_by_its_pod() -> None:
    auth = {"username": "u", "password": "p:w"}
    pod = build_batchsandbox("sb-1", spec(image="10.77.0.1:5001/a:1", image_auth=auth), Settings(), NOW)
    assert pod["spec"]["sandboxTemplate"]["spec"]["imagePullSecrets"] == [{"name": "sb-1-pull"}]
    assert "p:w" not in json.dumps(pod)  # the password is in the Secret only
    secret = pull_secret_manifest("sb-1", "10.77.0.1:5001/a:1", auth)
    assert secret["type"] == "kubernetes.io/dockerconfigjson" and secret["metadata"]["name"] == "sb-1-pull"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    entry = config["auths"]["10.77.0.1:5001"]
    assert entry["username"] == "u" and base64.b64decode(entry["auth"]) == b"u:p:w"


def test_a_network_policy_becomes_the_annotation_the_controller_reads() -> None:
    from opensandbox_platform.controller.pods import egress_request

    policy = {"defaultAction": "deny", "egress": [{"action": "allow", "target": "*.good.test"}]}
    obj = build_batchsandbox("id", spec(network_policy=policy), Settings(egress_upstream_dns=("10.0.0.53",)), NOW)
    assert egress_request(obj["metadata"]["annotations"]) == (policy, ("10.0.0.53",))
    assert read_entry({**obj, "metadata": {**obj["metadata"], "namespace": "ns"}}).has_policy
    plain = build_batchsandbox("id", spec(), Settings(), NOW)
    assert labels.NETWORK_POLICY not in plain["metadata"]["annotations"]
    assert not read_entry({**plain, "metadata": {**plain["metadata"], "namespace": "ns"}}).has_policy


def test_a_pooled_create_from_an_egress_pool_has_a_policy_with_or_without_its_own() -> None:
    from opensandbox_platform.controller.pods import egress_request
    from opensandbox_platform.server.runtimes.kubernetes_objects import pool_egress

    def entry(obj: dict[str, Any]) -> Any:
        return read_entry({**obj, "metadata": {**obj["metadata"], "namespace": "ns"}})

    assert pool_egress({"spec": {"egress": {}}}) and not pool_egress({"spec": {}})
    pooled = spec(extensions={"poolRef": "p"})
    policy = {"defaultAction": "deny", "egress": [{"action": "allow", "target": "x.test"}]}
    own = build_batchsandbox("id", replace(pooled, network_policy=policy), Settings(), NOW, "img", None, True)
    assert (egress_request(own["metadata"]["annotations"]) or ({},))[0] == policy  # the controller PUTs it
    assert entry(own).has_policy
    kept = build_batchsandbox("id", pooled, Settings(), NOW, "img", None, True)  # the Pool's policy stays
    assert labels.NETWORK_POLICY not in kept["metadata"]["annotations"] and entry(kept).has_policy
    assert not entry(build_batchsandbox("id", pooled, Settings(), NOW, "img", None, False)).has_policy


def test_a_claim_whose_policy_could_not_be_applied_is_a_5xx_and_a_pool_without_egress_a_400() -> None:
    from opensandbox_platform.server.runtimes.kubernetes import _failure_error

    def error_of(reason: str) -> Any:
        obj = as_cluster_returns(build_batchsandbox("id", spec(), Settings(), NOW), condition_status(reason, "why"))
        return _failure_error(read_entry(obj))

    failed = error_of("EgressPolicyFailed")
    assert (failed.status, failed.code) == (503, "SANDBOX::EGRESS_UNAVAILABLE") and "why" in failed.message
    refused = error_of("PoolWithoutEgress")
    assert (refused.status, refused.code) == (400, "SANDBOX::API_NOT_SUPPORTED")


def test_a_pooled_create_may_name_only_the_mounts_of_its_pools_sandbox_container() -> None:
    pool = {
        "spec": {
            "sandboxTemplate": {
                "spec": {
                    "volumes": [
                        {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}},
                        {"name": "node", "hostPath": {"path": "/srv/allowed"}},
                    ],
                    "containers": [
                        {"name": "sidecar", "volumeMounts": [{"name": "data", "mountPath": "/side"}]},
                        {
                            "name": labels.SANDBOX_CONTAINER,
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/data", "subPath": "./team/"},
                                {"name": "node", "mountPath": "/node/", "subPath": "x", "readOnly": True},
                                {"name": "nothing", "mountPath": "/nothing"},
                            ],
                        },
                    ],
                }
            }
        }
    }
    mounts = pool_mounts(pool)
    assert mounts == {
        ("/data", ("pvc", "shared", "team"), False),
        ("/node", ("host", "/srv/allowed/x", ""), True),
    }
    volumes = parse_volumes(
        [
            {"name": "ok-pvc", "mountPath": "/data", "pvc": {"claimName": "shared"}, "subPath": "team"},
            {"name": "ok-host", "mountPath": "/node", "host": {"path": "/srv/allowed/x"}, "readOnly": True},
            {"name": "side", "mountPath": "/side", "pvc": {"claimName": "shared"}},  # the sidecar's, not ours
            {"name": "writable", "mountPath": "/node2", "host": {"path": "/srv/allowed/x"}},
            {"name": "other-claim", "mountPath": "/other", "pvc": {"claimName": "other"}},
        ],
        ["/srv/allowed"],
        frozenset({"host", "pvc"}),
    )
    assert volumes_not_in_pool(volumes, mounts) == ["side", "writable", "other-claim"]
    assert pool_mounts({"spec": {"sandboxTemplate": {"spec": {"image": "short-form"}}}}) == frozenset()


SNAP_IMAGE = "10.77.0.1:5000/snapshots@sha256:abc"


def test_a_sandbox_from_a_snapshot_pulls_its_image_with_the_registry_secret_and_names_it() -> None:
    settings = Settings("Never", PLACEMENT, snapshot_pull_secret="snap-registry")
    obj = build_batchsandbox("id-1", spec(image=SNAP_IMAGE, snapshot_id="snap-1"), settings, NOW)
    pod = obj["spec"]["sandboxTemplate"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == SNAP_IMAGE and container["imagePullPolicy"] == "IfNotPresent"
    assert pod["imagePullSecrets"] == [{"name": "snap-registry"}]
    assert obj["metadata"]["labels"][labels.RESTORED_FROM] == "snap-1"
    entry = read_entry(as_cluster_returns(obj))
    assert entry.info.snapshot_id == "snap-1" and "sandbox.opensandbox.io/restored-from" not in entry.info.metadata


def test_pause_and_resume_are_patches_and_states() -> None:
    settings = Settings("Never", PLACEMENT, snapshot_pull_secret="snap-registry")
    created = build_batchsandbox("id-1", spec(), settings, NOW)
    running = {"phase": "Running", "sandboxes": [{"index": 0, "podName": "id-1-0", "podIP": "10.77.1.5"}]}
    raw = as_cluster_returns(created, running)
    raw["spec"]["sandboxTemplate"]["spec"]["containers"][0]["env"].append(
        {"name": labels.START_GATE_ENV, "value": labels.START_GATE}
    )
    pausing = as_cluster_returns(created, running)
    pausing["metadata"]["annotations"][labels.PAUSING] = "snap-2"
    entry = read_entry(pausing)
    assert (entry.info.state, entry.pausing, entry.pod_ip) == ("Pausing", "snap-2", "10.77.1.5")

    patch = paused_patch(raw, "snap-2", SNAP_IMAGE, "snap-registry")
    assert patch["spec"]["replicas"] == 0 and patch["metadata"]["resourceVersion"] == "7"
    assert patch["metadata"]["annotations"] == {labels.PAUSING: None, labels.PAUSED: "snap-2"}
    assert patch["metadata"]["labels"] == {labels.RESTORED_FROM: "snap-2"}
    template = patch["spec"]["sandboxTemplate"]["spec"]
    (container,) = template["containers"]
    assert container["image"] == SNAP_IMAGE and container["imagePullPolicy"] == "IfNotPresent"
    assert container["env"] == [{"name": "A", "value": "1"}]  # the create's start gate is not kept
    assert container["command"] == ["python3", "app.py"] and template["nodeSelector"] == PLACEMENT["nodeSelector"]
    assert template["imagePullSecrets"] == [{"name": "snap-registry"}]
    assert raw["spec"]["sandboxTemplate"]["spec"]["containers"][0]["image"] == "localhost/app:1"  # not changed

    paused = as_cluster_returns(created, {"phase": "Running", "sandboxes": running["sandboxes"]})
    paused["spec"]["replicas"] = 0
    paused["metadata"]["annotations"][labels.PAUSED] = "snap-2"
    entry = read_entry(paused)  # the pod may still be going: no endpoint for a paused sandbox
    assert (entry.info.state, entry.pod_ip, entry.paused_into) == ("Paused", None, "snap-2")

    resumed = as_cluster_returns(created, {"phase": "Paused"})
    resumed["spec"]["replicas"] = RESUME_PATCH["spec"]["replicas"]
    assert read_entry(resumed).info.state == "Pending"  # until the new pod runs


# --- the pause of a pooled sandbox: it leaves its Pool for a template built from the Pool's -----------
EGRESS_POOL_UPSTREAM = ["10.0.0.10"]


def merged(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies one (null deletes)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merged(result.get(key), value)
    return result


def pool_object(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    template = {"metadata": {"labels": {"team": "pool"}}, "spec": spec}
    return {
        "metadata": {"name": "warm", "namespace": "ns"},
        "spec": {"capacity": 4, "sandboxTemplate": template, **extra},
    }


SHORT_POOL = {
    "image": "registry/base:1",
    "command": ["sleep", "infinity"],
    "env": [{"name": "FROM_POOL", "value": "p"}, {"name": "A", "value": "pool"}],
    "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}},
    **PLACEMENT,
}


def pooled_raw(env: dict[str, str] | None = None, entrypoint: list[str] | None = None) -> dict[str, Any]:
    request = spec(
        extensions={"poolRef": "warm"},
        env={"A": "claim"} if env is None else env,
        entrypoint=entrypoint or ["run", "it"],
    )
    created = build_batchsandbox("id-1", request, Settings(), NOW, "registry/base:1")
    running = {"phase": "Running", "sandboxes": [{"index": 0, "podName": "warm-x", "podUID": "u", "podIP": "10.1.1.1"}]}
    return as_cluster_returns(created, running)


def test_a_paused_pooled_sandbox_resumes_from_the_pools_template_with_its_own_entrypoint_and_env() -> None:
    pool = pool_object(SHORT_POOL)
    template = left_pool_template(pool, pooled_raw())
    (main,) = template["spec"]["containers"]
    assert main["name"] == labels.SANDBOX_CONTAINER and main["image"] == "registry/base:1"
    assert main["command"] == ["run", "it"] and "args" not in main
    assert main["env"] == [{"name": "FROM_POOL", "value": "p"}, {"name": "A", "value": "claim"}]  # the claim's wins
    assert main["resources"] == SHORT_POOL["resources"]
    assert (
        template["spec"]["nodeSelector"] == PLACEMENT["nodeSelector"] and template["spec"]["restartPolicy"] == "Never"
    )
    assert template["metadata"] == {"labels": {"team": "pool"}}
    assert pool["spec"]["sandboxTemplate"]["spec"]["image"] == "registry/base:1" and "containers" not in pool["spec"][
        "sandboxTemplate"]["spec"], "the Pool is not changed"  # fmt: skip

    keep_alive = pooled_raw(env={}, entrypoint=list(KEEP_ALIVE_ENTRYPOINT))  # the pooled template is empty
    (main,) = left_pool_template(pool, keep_alive)["spec"]["containers"]
    assert main["command"] == ["sleep", "infinity"] and main["env"] == SHORT_POOL["env"]


def test_a_pools_own_containers_volumes_and_restart_policy_are_kept_and_it_needs_a_sandbox_container() -> None:
    sidecar = {"name": "helper", "image": "helper:1"}
    main = {"name": "sandbox", "image": "registry/base:1", "args": ["--serve"],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}  # fmt: skip
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}]
    pool = pool_object({"containers": [sidecar, main], "volumes": volumes, "restartPolicy": "OnFailure"})
    template = left_pool_template(pool, pooled_raw(env={}, entrypoint=list(KEEP_ALIVE_ENTRYPOINT)))
    assert template["spec"]["containers"] == [sidecar, main] and template["spec"]["volumes"] == volumes
    assert template["spec"]["restartPolicy"] == "OnFailure"
    with pytest.raises(ValueError, match="no container named 'sandbox'"):
        left_pool_template(pool_object({"containers": [sidecar]}), pooled_raw())


def test_the_pause_patch_of_a_pooled_sandbox_leaves_the_pool_for_a_direct_batchsandbox_on_the_snapshot() -> None:
    raw = pooled_raw()
    pool = pool_object(SHORT_POOL)
    patch = left_pool_patch(raw, pool, "snap-3", SNAP_IMAGE, "snap-registry")
    assert patch["spec"]["poolRef"] is None and patch["spec"]["replicas"] == 0
    assert patch["metadata"]["resourceVersion"] == "7" and patch["metadata"]["labels"] == {
        labels.RESTORED_FROM: "snap-3"
    }
    assert labels.NETWORK_POLICY not in patch["metadata"]["annotations"], "a Pool without egress: no policy"

    after = merged(raw, patch)
    bs = BatchSandboxSpec.model_validate(after["spec"])  # a valid direct-mode BatchSandbox
    assert bs.poolRef is None and bs.replicas == 0
    assert set(after["spec"]["sandboxTemplate"]["spec"]) == {"containers", "imagePullSecrets", "restartPolicy",
                                                            *PLACEMENT}, "the claim's short form is gone"  # fmt: skip
    assert bs.sandboxTemplate is not None
    pod = build_pod(name="id-1-0", namespace="ns", template=bs.sandboxTemplate, pod_labels={}, owner=after,
                    execd_image="execd:1")  # fmt: skip
    main = next(c for c in pod["spec"]["containers"] if c["name"] == labels.SANDBOX_CONTAINER)
    assert main["image"] == SNAP_IMAGE and main["args"] == ["run", "it"]  # started by execd's bootstrap
    assert pod["metadata"]["labels"]["team"] == "pool" and pod["spec"]["imagePullSecrets"] == [
        {"name": "snap-registry"}
    ]
    assert read_entry(after | {"status": {"phase": "Paused"}}).info.state == "Paused"


def test_a_sandbox_leaving_an_egress_pool_keeps_the_policy_it_ran_under() -> None:
    egress = {"egress": {"defaultAction": "deny", "upstreamDns": EGRESS_POOL_UPSTREAM}}
    pool = pool_object({"image": "registry/base:1"}, **egress)
    patch = left_pool_patch(pooled_raw(), pool, "snap-3", SNAP_IMAGE, "")
    value = json.loads(patch["metadata"]["annotations"][labels.NETWORK_POLICY])
    assert value == {"policy": {"defaultAction": "deny", "egress": []}, "upstreamDns": EGRESS_POOL_UPSTREAM}

    own = {"defaultAction": "deny", "egress": [{"action": "allow", "target": "pypi.org"}]}
    raw = pooled_raw()
    raw["metadata"]["annotations"][labels.NETWORK_POLICY] = json.dumps({"policy": own, "upstreamDns": []})
    value = json.loads(left_pool_patch(raw, pool, "snap-3", SNAP_IMAGE, "")["metadata"]["annotations"][
        labels.NETWORK_POLICY])  # fmt: skip
    assert value == {"policy": own, "upstreamDns": EGRESS_POOL_UPSTREAM}, "its own policy, the Pool's resolvers"
