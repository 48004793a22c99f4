import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import SandboxTemplate
from opensandbox_platform.controller.pods import (
    DEFAULT_CONTAINER,
    EXECD_INIT_CONTAINER,
    EXECD_INSTALLER,
    PodInfo,
    build_pod,
    main_container,
    pod_spec,
    slim_pod,
    template_revision,
)

OWNER = {"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool", "metadata": {"name": "p", "uid": "u1"}}


def template(**spec: object) -> SandboxTemplate:
    return SandboxTemplate.model_validate({"spec": spec})


def as_written(containers: list[dict[str, object]]) -> list[dict[str, object]]:
    """The containers without the security defaults every pod gets (tested on their own below)."""
    return [{k: v for k, v in c.items() if k != "securityContext"} for c in containers]


def test_short_form_becomes_the_sandbox_container_and_the_rest_passes_through() -> None:
    spec = pod_spec(
        template(
            image="ubuntu:latest",
            command=["sleep", "infinity"],
            env=[{"name": "A", "value": "1"}],
            resources={"limits": {"cpu": "1"}},
            nodeSelector={"gpu": "yes"},
            runtimeClassName="gvisor",
            tolerations=[{"key": "k", "operator": "Exists"}],
        ),
        execd_image=None,
    )
    assert as_written(spec["containers"]) == [
        {
            "name": "sandbox",
            "image": "ubuntu:latest",
            "command": ["sleep", "infinity"],
            "env": [{"name": "A", "value": "1"}],
            "resources": {"limits": {"cpu": "1"}},
        }
    ]
    assert spec["nodeSelector"] == {"gpu": "yes"}
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["tolerations"] == [{"key": "k", "operator": "Exists"}]


def test_containers_win_over_the_short_form() -> None:
    spec = pod_spec(template(image="x", containers=[{"name": "main", "image": "y"}]), execd_image=None)
    assert as_written(spec["containers"]) == [{"name": "main", "image": "y"}]


def test_untrusted_code_gets_safe_defaults_unless_the_template_says_otherwise() -> None:
    spec = pod_spec(template(image="ubuntu"), execd_image="osb/execd:1")
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    main = main_container(spec)["securityContext"]
    assert main["allowPrivilegeEscalation"] is False
    assert main["capabilities"] == {"drop": ["ALL"], "add": list(labels.SANDBOX_CAPABILITIES)}
    assert "SYS_ADMIN" not in main["capabilities"]["add"] and "NET_RAW" not in main["capabilities"]["add"]
    installer = spec["containers"][0]["securityContext"]
    assert installer == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]},
    }
    chosen = pod_spec(
        template(
            image="ubuntu",
            automountServiceAccountToken=True,
            securityContext={"seccompProfile": {"type": "Unconfined"}, "runAsNonRoot": True},
            containers=[{"name": "main", "image": "y", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}],
        ),
        execd_image=None,
    )
    assert chosen["automountServiceAccountToken"] is True
    assert chosen["securityContext"] == {"seccompProfile": {"type": "Unconfined"}, "runAsNonRoot": True}
    assert chosen["containers"][0]["securityContext"]["capabilities"] == {"add": ["NET_ADMIN"]}


def test_execd_injection_wraps_the_entrypoint_and_gates_readiness() -> None:
    spec = pod_spec(template(image="ubuntu", command=["sleep"], args=["infinity"]), execd_image="osb/execd:1")
    installer, main = spec["containers"]
    # The installer comes first: the kubelet runs its postStart copy before it starts the sandbox.
    assert installer["name"] == EXECD_INSTALLER and installer["image"] == "osb/execd:1"
    copy = installer["lifecycle"]["postStart"]["exec"]["command"]
    assert copy == ["/bin/sh", "-c", f"cp -a {labels.EXECD_IMAGE_DIR}/. {labels.EXECD_MOUNT}/"]
    assert installer["resources"] == {"requests": {"cpu": "1m", "memory": "4Mi"}}
    assert "initContainers" not in spec
    assert main["name"] == "sandbox" and main_container(spec) is main
    assert main["command"] == [labels.EXECD_BOOTSTRAP]
    assert main["args"] == ["sleep", "infinity"]
    assert main["readinessProbe"]["httpGet"]["port"] == labels.EXECD_PORT
    assert {"name": labels.EXECD_VOLUME, "emptyDir": {}} in spec["volumes"]
    mount = {"name": labels.EXECD_VOLUME, "mountPath": labels.EXECD_MOUNT}
    assert installer["volumeMounts"] == main["volumeMounts"] == [mount]


def test_execd_installer_idles_until_the_pod_goes(tmp_path: Path) -> None:
    """Its command exits at once on SIGTERM (as PID 1, `sleep` would ignore it for the whole grace)."""
    spec = pod_spec(template(image="ubuntu"), execd_image="osb/execd:1")
    command = spec["containers"][0]["command"]
    proc = subprocess.Popen(command)
    time.sleep(0.3)
    assert proc.poll() is None
    proc.terminate()
    assert proc.wait(5) == 0


def test_execd_by_init_container_as_upstream() -> None:
    spec = pod_spec(template(image="ubuntu"), execd_image="osb/execd:1", execd_install=EXECD_INIT_CONTAINER)
    (init,) = spec["initContainers"]
    assert init["name"] == EXECD_INSTALLER and init["image"] == "osb/execd:1"
    assert init["command"] == ["/bin/sh", "-c", f"cp -a {labels.EXECD_IMAGE_DIR}/. {labels.EXECD_MOUNT}/"]
    assert [c["name"] for c in spec["containers"]] == ["sandbox"]


def test_pods_with_the_installer_name_their_default_container() -> None:
    pod = build_pod(
        name="p", namespace="ns", template=template(image="ubuntu"), pod_labels={}, owner=OWNER, execd_image="e:1"
    )
    assert pod["metadata"]["annotations"][DEFAULT_CONTAINER] == "sandbox"
    plain = build_pod(
        name="p", namespace="ns", template=template(image="ubuntu"), pod_labels={}, owner=OWNER, execd_image=None
    )
    assert DEFAULT_CONTAINER not in plain["metadata"]["annotations"]


def test_a_sandbox_that_exited_beside_the_idle_installer_is_finished() -> None:
    """The installer keeps the pod Running; the sandbox container's end is what counts."""

    def pod_with(policy: str, code: int | None) -> PodInfo:
        pod = build_pod(
            name="p", namespace="ns", template=template(image="u", restartPolicy=policy), pod_labels={}, owner=OWNER,
            execd_image="e:1",
        )  # fmt: skip
        pod["metadata"].update(uid="u", resourceVersion="1", creationTimestamp="2026-01-01T00:00:00Z")
        sandbox: dict[str, Any] = {"name": "sandbox", "state": {"running": {}}}
        if code is not None:
            sandbox["state"] = {"terminated": {"exitCode": code}}
        installer = {"name": EXECD_INSTALLER, "state": {"running": {}}}
        pod["status"] = {"phase": "Running", "containerStatuses": [installer, sandbox]}
        return slim_pod(pod)

    assert pod_with("Never", 0).finished and pod_with("Never", 3).finished
    assert pod_with("Never", 3).main_exit_code == 3 and not pod_with("Never", 3).lost
    assert pod_with("OnFailure", 0).finished and not pod_with("OnFailure", 1).finished  # 1: restarted
    assert not pod_with("Always", 0).finished  # restarted
    assert not pod_with("Never", None).finished


def test_revision_changes_with_the_template_only() -> None:
    a = template(image="ubuntu", command=["sleep", "infinity"])
    assert template_revision(a) == template_revision(template(image="ubuntu", command=["sleep", "infinity"]))
    assert template_revision(a) != template_revision(template(image="ubuntu:24.04", command=["sleep", "infinity"]))


def test_slim_pod_reads_claim_readiness_and_loss() -> None:
    pod = build_pod(
        name="p-abc",
        namespace="ns",
        template=template(image="ubuntu"),
        pod_labels={labels.POOL: "p"},
        owner=OWNER,
        execd_image=None,
    )
    pod["metadata"].update(uid="u2", resourceVersion="7", creationTimestamp="2026-01-01T00:00:00Z")
    pod["metadata"]["labels"].update({labels.BATCHSANDBOX: "bs", labels.INDEX: "2"})
    pod["status"] = {
        "phase": "Running",
        "podIP": "10.0.0.9",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    info = slim_pod(pod)
    assert (info.pool, info.batchsandbox, info.index, info.ready, info.ip) == ("p", "bs", 2, True, "10.0.0.9")
    assert info.owner_uid == "u1" and info.claimed and not info.lost

    pod["status"] = {"phase": "Failed", "reason": "Evicted"}
    assert slim_pod(pod).lost
    pod["status"] = {
        "phase": "Succeeded",
        "containerStatuses": [{"name": "sandbox", "state": {"terminated": {"exitCode": 0}}}],
    }
    finished = slim_pod(pod)
    assert finished.finished and not finished.lost and finished.main_exit_code == 0


def test_pooled_entrypoint_and_env_become_an_execd_bootstrap_request() -> None:
    from opensandbox_platform.api.crds import BatchSandboxSpec
    from opensandbox_platform.controller.status import bootstrap_request

    def spec(**template_spec: object) -> BatchSandboxSpec:
        return BatchSandboxSpec.model_validate({"poolRef": "p", "sandboxTemplate": {"spec": template_spec}})

    assert bootstrap_request(BatchSandboxSpec.model_validate({"poolRef": "p"})) is None
    assert bootstrap_request(spec(image="ignored:in-pooled-mode")) is None
    assert bootstrap_request(spec(command=["sleep"], args=["infinity"], env=[{"name": "A", "value": "1"}])) == {
        "argv": ["sleep", "infinity"],
        "env": {"A": "1"},
    }
    assert bootstrap_request(spec(env=[{"name": "B"}], workingDir="/w")) == {"env": {"B": ""}, "cwd": "/w"}


def test_a_waiting_reason_that_fails_the_pod_carries_the_kubelets_words() -> None:
    pod = build_pod(
        name="p", namespace="ns", template=template(image="u"), pod_labels={}, owner=OWNER, execd_image=None
    )
    pod["metadata"].update(uid="u", resourceVersion="1", creationTimestamp="2026-01-01T00:00:00Z")
    pull = "failed to pull: 401 Unauthorized " + "x" * 1000
    waiting = {"waiting": {"reason": "ErrImagePull", "message": pull}}
    pod["status"] = {"phase": "Pending", "containerStatuses": [{"name": "sandbox", "state": waiting}]}
    info = slim_pod(pod)
    assert info.failure == "ErrImagePull (sandbox)"
    assert info.failure_detail.startswith("failed to pull: 401 Unauthorized") and len(info.failure_detail) == 400
    pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ImagePullBackOff"}}
    assert slim_pod(pod).failure_detail == ""


def test_egress_sidecar_starts_first_holds_net_admin_alone_and_has_a_token_of_its_own() -> None:
    from opensandbox_platform.api import tokens
    from opensandbox_platform.controller.pods import EgressSidecar, egress_request

    policy = {"defaultAction": "deny", "egress": [{"action": "allow", "target": "*.good.test"}]}
    annotation = {labels.NETWORK_POLICY: '{"policy":' + json.dumps(policy) + ',"upstreamDns":["10.0.0.53"]}'}
    request = egress_request(annotation)
    assert request == (policy, ("10.0.0.53",)) and egress_request({}) is None
    key = b"k" * 32
    pod = build_pod(
        name="bs-0",
        namespace="ns",
        template=template(image="ubuntu"),
        pod_labels={},
        owner=OWNER,
        execd_image="e:1",
        token_key=key,
        execd_install=EXECD_INIT_CONTAINER,
        egress=EgressSidecar("egress:1", *request),
    )
    spec = pod["spec"]
    first = spec["initContainers"][0]
    assert first["name"] == labels.EGRESS_CONTAINER and first["restartPolicy"] == "Always"  # a native sidecar
    assert first["startupProbe"]["httpGet"]["path"] == "/health"  # the others start once it enforces
    assert first["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    env = {e["name"]: e["value"] for e in first["env"]}
    assert json.loads(env["OPENSANDBOX_EGRESS_RULES"]) == policy and env["OPENSANDBOX_EGRESS_UPSTREAM"] == "10.0.0.53"
    assert env["OPENSANDBOX_EGRESS_TOKEN"] == tokens.egress_token(key, "bs-0") != tokens.pod_token(key, "bs-0")
    for container in [*spec["containers"], *spec["initContainers"][1:]]:
        assert "NET_ADMIN" not in json.dumps(container.get("securityContext", {}))
        assert env["OPENSANDBOX_EGRESS_TOKEN"] not in json.dumps(container)  # the sandbox cannot read it
    assert {"name": labels.EGRESS_STATE_VOLUME, "emptyDir": {}} in spec["volumes"]
    with pytest.raises(ValueError):
        egress_request({labels.NETWORK_POLICY: '["not", "an", "object"]'})


def test_an_egress_pool_puts_its_initial_policy_in_the_sidecar_of_every_pod_and_rolls_its_pods() -> None:
    from opensandbox_platform.api.crds import PoolSpec
    from opensandbox_platform.controller.pods import pool_egress, pool_revision
    from opensandbox_platform.controller.settings import Settings

    base = {"maxBufferSize": 1, "capacity": 1, "sandboxTemplate": {"spec": {"image": "ubuntu"}}}
    plain = PoolSpec.model_validate(base)
    guarded = PoolSpec.model_validate({**base, "egress": {"upstreamDns": ["10.0.0.53:53"]}})
    settings = Settings(egress_image="egress:1", egress_pull_policy="Never", token_key=b"k" * 32)
    assert pool_egress(plain, settings) is None
    sidecar = pool_egress(guarded, settings)
    assert sidecar is not None and sidecar.pull_policy == "Never"
    assert sidecar.policy == {"defaultAction": "deny", "egress": []}  # the default: an idle pod reaches nothing
    assert sidecar.upstream_dns == ("10.0.0.53:53",)
    pod = build_pod(name="p-x", namespace="ns", template=guarded.sandboxTemplate, pod_labels={}, owner=OWNER,
                    execd_image="e:1", token_key=settings.token_key, egress=sidecar)  # fmt: skip
    first = pod["spec"]["initContainers"][0]
    assert first["name"] == labels.EGRESS_CONTAINER
    assert {"name": "OPENSANDBOX_EGRESS_RULES", "value": '{"defaultAction":"deny","egress":[]}'} in first["env"]
    # enabling egress (or changing its default) is a new revision: old idle pods roll, none is handed out
    assert pool_revision(plain) == template_revision(plain.sandboxTemplate)  # pools without stay as they were
    allow = PoolSpec.model_validate({**base, "egress": {"defaultAction": "allow"}})
    assert len({pool_revision(plain), pool_revision(guarded), pool_revision(allow)}) == 3
    # without the controller's flags: refused (the Pool reconciler turns it into a condition and an Event)
    for missing in (Settings(token_key=b"k" * 32), Settings(egress_image="egress:1")):
        with pytest.raises(ValueError, match="--egress-image and --sandbox-token-key-file"):
            pool_egress(guarded, missing)


def test_slim_pod_reads_whether_the_claims_policy_was_applied() -> None:
    pod = build_pod(name="p-x", namespace="ns", template=template(image="u"), pod_labels={}, owner=OWNER,
                    execd_image=None, annotations={labels.NETWORK_POLICY_APPLIED: "t"})  # fmt: skip
    pod["metadata"].update(uid="u", resourceVersion="1", creationTimestamp="2026-01-01T00:00:00Z")
    pod["status"] = {"phase": "Running"}
    assert slim_pod(pod).policy_applied
    del pod["metadata"]["annotations"][labels.NETWORK_POLICY_APPLIED]
    assert not slim_pod(pod).policy_applied
