"""The pure parts of kubernetes snapshots: finding the container on its node (a crafted /proc), its
overlay's upper dir and freezer, the committer pod, the job, the outcome, and what a restore holds
(runtimes/kubernetes_committer.py, kubernetes_snapshots.py, oci_registry.py)."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from opensandbox_platform.api import labels
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import kubernetes_committer as committer
from opensandbox_platform.server.runtimes import kubernetes_snapshots as ksnaps
from opensandbox_platform.server.runtimes.base import Held, SnapshotState
from opensandbox_platform.server.runtimes.oci_registry import Reference, Registry, docker_config_auths

CID = "3f1e" * 16


def fake_proc(root: Path, processes: dict[int, tuple[int, str]]) -> str:
    """pid -> (ppid, cgroup text)."""
    for pid, (ppid, cgroup) in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(cgroup)
        (root / str(pid) / "stat").write_text(f"{pid} (a (tricky) name) S {ppid} 1 1 0 -1\n")
    (root / "self").mkdir()
    return str(root)


def test_the_containers_init_is_its_process_whose_parent_is_the_shim(tmp_path: Path) -> None:
    inside = f"12:freezer:/osb-node/kubepods/pod1/{CID}\n0::/\n"
    proc = fake_proc(
        tmp_path,
        {
            10: (1, "12:freezer:/\n"),  # the shim
            11: (10, inside),  # the container's init
            12: (11, inside),  # its children
            13: (12, inside),
            20: (1, "12:freezer:/osb-node/kubepods/pod1/other\n"),
        },
    )
    pids = committer.container_pids(proc, CID)
    assert pids == {11: 10, 12: 11, 13: 12}
    assert committer.init_pid(pids) == 11
    with pytest.raises(committer.CommitFailed):
        committer.init_pid({})


MOUNTINFO = (
    "1200 1100 0:120 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/c/snapshots/2/fs:/c/snapshots/1/fs,"
    "upperdir=/c/snap\\040shots/3/fs,workdir=/c/snapshots/3/work\n"
    "1201 1200 0:121 / /proc rw,nosuid - proc proc rw\n"
)


def test_the_upper_dir_is_read_from_the_root_overlay() -> None:
    assert committer.upper_dir(MOUNTINFO) == "/c/snap shots/3/fs"
    with pytest.raises(committer.CommitFailed, match="not an overlay"):
        committer.upper_dir("1 0 0:1 / / rw - ext4 /dev/sda1 rw\n")
    with pytest.raises(committer.CommitFailed, match="no upperdir"):
        committer.upper_dir("1 0 0:1 / / rw - overlay overlay rw,lowerdir=/a\n")


def test_the_freezer_is_v1s_when_there_is_one_else_v2s() -> None:
    v1 = "12:freezer:/osb-node/pod1/c1\n3:memory:/osb-node/pod1/c1\n0::/\n"
    assert committer.freezer_file(v1) == ("freezer/osb-node/pod1/c1/freezer.state", "FROZEN", "THAWED")
    assert committer.freezer_file("0::/kubepods/pod1/c1\n") == ("kubepods/pod1/c1/cgroup.freeze", "1", "0")
    with pytest.raises(committer.CommitFailed):
        committer.freezer_file("3:memory:/x\n")


def test_frozen_thaws_even_when_the_capture_fails(tmp_path: Path) -> None:
    state = tmp_path / "sys/fs/cgroup/freezer/c1/freezer.state"
    state.parent.mkdir(parents=True)
    state.write_text("THAWED")
    seen = []
    with pytest.raises(RuntimeError), committer.frozen(str(tmp_path), "12:freezer:/c1\n"):
        seen.append(state.read_text())
        raise RuntimeError("capture failed")
    assert seen == ["FROZEN"] and state.read_text() == "THAWED"


def test_a_committer_stopped_by_sigterm_thaws_the_container(tmp_path: Path) -> None:
    """The pod's deadline or deletion is a SIGTERM: the container it froze must not stay frozen."""
    freeze = tmp_path / "sys/fs/cgroup/kubepods/c1/cgroup.freeze"
    freeze.parent.mkdir(parents=True)
    freeze.write_text("0")
    script = (
        "import time\n"
        "from opensandbox_platform.server.runtimes import kubernetes_committer as c\n"
        "c.stop_on_sigterm()\n"
        f"with c.frozen({str(tmp_path)!r}, '0::/kubepods/c1\\n'):\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while freeze.read_text() != "1":
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        proc.kill()
    assert freeze.read_text() == "0"
    assert "the committer was stopped" in (proc.stderr.read() if proc.stderr else "")


SETTINGS = ksnaps.CommitSettings(
    repository="10.77.0.1:5000/snapshots",
    committer_image="opensandbox/server:v0.1.0",
    max_bytes=256 << 20,
    timeout_seconds=120,
    ca_pem="PEM",
    registry_secret="registry-creds",
)


def sandbox_pod(state: str = "running", node: str = "node-a") -> dict[str, object]:
    return {
        "spec": {"nodeName": node},
        "status": {
            "containerStatuses": [
                {"name": labels.EXECD_INSTALLER, "state": {"running": {}}, "containerID": "containerd://installer"},
                {
                    "name": labels.SANDBOX_CONTAINER,
                    "state": {state: {}},
                    "containerID": f"containerd://{CID}",
                    "image": "10.77.0.1:5000/base:v1",
                    "imageID": "10.77.0.1:5000/base@sha256:abc",
                },
            ]
        },
    }


def test_the_job_names_the_sandbox_container_and_the_digest_it_runs() -> None:
    job, node = ksnaps.commit_job("snap-1", sandbox_pod(), SETTINGS)
    assert node == "node-a"
    assert job.container_id == CID and job.base_image == "10.77.0.1:5000/base@sha256:abc"
    assert job.max_bytes == 256 << 20 and job.auth_file.endswith("/.dockerconfigjson")
    for pod in (sandbox_pod(state="terminated"), sandbox_pod(node="")):
        with pytest.raises(ApiError) as refused:
            ksnaps.commit_job("snap-1", pod, SETTINGS)
        assert refused.value.status == 409


def test_the_committer_pod_runs_on_the_node_privileged_with_bounded_scratch() -> None:
    job, node = ksnaps.commit_job("snap-1", sandbox_pod(), SETTINGS)
    owner = {"apiVersion": labels.API_VERSION, "kind": "BatchSandbox", "name": "sb", "uid": "u"}
    pod = ksnaps.committer_pod(job, node, SETTINGS, owner)
    spec = pod["spec"]
    assert pod["metadata"]["name"] == "snap-1-commit" and pod["metadata"]["ownerReferences"] == [owner]
    assert pod["metadata"]["labels"][labels.SNAPSHOT_COMMITTER] == "snap-1"
    assert spec["nodeName"] == "node-a" and spec["hostPID"] is True and spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False and spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["activeDeadlineSeconds"] == 120
    (container,) = spec["containers"]
    assert container["args"] == ["commit-snapshot"] and container["securityContext"]["privileged"] is True
    assert json.loads(container["env"][0]["value"])["container_id"] == CID
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["scratch"]["emptyDir"]["sizeLimit"] == str(2 * (256 << 20) + ksnaps.SCRATCH_SLACK)
    assert volumes["registry"]["secret"]["secretName"] == "registry-creds"
    # the job survives the trip through the env
    assert committer.Job.from_json(json.loads(container["env"][0]["value"])) == job


def test_the_thaw_pod_is_the_committers_on_a_thaw_only_job() -> None:
    job, node = ksnaps.commit_job("snap-1", sandbox_pod(), SETTINGS)
    owner = {"apiVersion": labels.API_VERSION, "kind": "BatchSandbox", "name": "sb", "uid": "u"}
    created = ksnaps.committer_pod(job, node, SETTINGS, owner)
    read_back = {**created, "metadata": {**created["metadata"], "uid": "x", "resourceVersion": "7"}, "status": {}}
    for source in (created, read_back):
        rescue = ksnaps.thaw_pod(source)
        assert rescue["metadata"] == {"name": "snap-1-thaw", "labels": created["metadata"]["labels"],
                                      "ownerReferences": [owner]}  # fmt: skip
        assert rescue["spec"]["nodeName"] == "node-a" and rescue["spec"]["hostPID"] is True
        thaw_job = committer.Job.from_json(json.loads(rescue["spec"]["containers"][0]["env"][0]["value"]))
        assert thaw_job == committer.Job(**{**json.loads(created["spec"]["containers"][0]["env"][0]["value"]),
                                            "thaw_only": True})  # fmt: skip
    assert not json.loads(created["spec"]["containers"][0]["env"][0]["value"]).get("thaw_only")  # a copy


def test_thaw_only_thaws_a_frozen_container_and_leaves_a_gone_one(tmp_path: Path) -> None:
    cgroup = f"0::/kubepods/pod1/{CID}\n"
    proc = fake_proc(tmp_path / "proc", {10: (1, "0::/\n"), 11: (10, cgroup), 12: (11, cgroup)})
    freeze = tmp_path / "proc/10/root/sys/fs/cgroup/kubepods/pod1" / CID / "cgroup.freeze"  # through the shim's root
    freeze.parent.mkdir(parents=True)
    freeze.write_text("1")
    job = committer.Job("snap-1", CID, "base", "repo", 1, 1, proc=proc, thaw_only=True)
    assert committer.run(job) == {"ok": True, "thawed": True}
    assert freeze.read_text() == "0"
    gone = committer.Job("snap-1", "9" * 64, "base", "repo", 1, 1, proc=proc, thaw_only=True)
    assert committer.run(gone) == {"ok": True, "thawed": False}


def test_the_outcome_is_the_termination_message_or_why_the_pod_ended() -> None:
    def ended(message: str, reason: str = "Completed") -> dict[str, object]:
        terminated = {"message": message, "reason": reason, "exitCode": 1}
        return {"status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": terminated}}]}}

    ok = {"ok": True, "image": "r/s@sha256:1", "files": 3, "bytes": 10, "skipped": 1}
    assert ksnaps.outcome_of(ended(json.dumps(ok))) == ok
    assert (
        ksnaps.outcome_of({"status": {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}}) is None
    )
    killed = ksnaps.outcome_of(ended("", "OOMKilled"))
    assert killed is not None and not killed["ok"] and "OOMKilled" in killed["message"]
    deadline = ksnaps.outcome_of({"status": {"phase": "Failed", "reason": "DeadlineExceeded"}})
    assert deadline is not None and "DeadlineExceeded" in deadline["message"]
    # only an outcome the committer did not write calls for the thaw-only rescue
    assert killed["died"] and deadline["died"] and "died" not in ksnaps.outcome_of(ended(json.dumps(ok)))  # type: ignore[operator]

    record = ksnaps.Record("snap-1", "sb", None, Held("img", []), created_at="2026-11-30T12:00:00Z")
    ksnaps.apply_outcome(record, ok)
    assert record.state == SnapshotState.READY and record.image == "r/s@sha256:1"
    assert (
        record.message
        == "3 files, 10 bytes; left out 1 device nodes, sockets or names the layer format reserves (.wh.*)"
    )
    ksnaps.apply_outcome(record, {"ok": False, "reason": "snapshot_too_large", "message": "too big"})
    assert (record.state, record.reason, record.message) == (SnapshotState.FAILED, "snapshot_too_large", "too big")


def test_the_record_round_trips_through_its_configmap() -> None:
    record = ksnaps.Record("snap-1", "sb", "name", Held("img", ["sleep"], {"A": "1"}, 250, 1 << 27), created_at="t")
    configmap = ksnaps.record_configmap(record)
    assert configmap["metadata"]["labels"][labels.SNAPSHOT_OF] == "sb"
    assert ksnaps.Record.from_configmap(configmap) == record
    assert ksnaps.Record.from_configmap({"data": {"record": "not json"}}) is None


def test_a_restore_holds_the_templates_env_and_limits() -> None:
    bsbx = {
        "spec": {
            "sandboxTemplate": {
                "spec": {
                    "containers": [
                        {
                            "name": labels.SANDBOX_CONTAINER,
                            "env": [{"name": "A", "value": "1"}],
                            "resources": {"limits": {"cpu": "250m", "memory": "128Mi"}},
                        }
                    ]
                }
            }
        }
    }
    held = ksnaps.held_of(bsbx, "img", ["sleep", "infinity"])
    assert held == Held("img", ["sleep", "infinity"], {"A": "1"}, 250, 128 << 20)
    assert ksnaps.held_of({}, "img", []) == Held("img", [], {}, None, None)


def test_references_and_docker_config_credentials() -> None:
    assert Reference.parse("10.77.0.1:5000/a/b:v1") == Reference("10.77.0.1:5000", "a/b", "v1")
    assert Reference.parse("r.io/a@sha256:1") == Reference("r.io", "a", "", "sha256:1")
    assert Reference.parse("busybox") == Reference("registry-1.docker.io", "library/busybox")
    assert Reference.parse("localhost/x:1").registry == "localhost"
    encoded = base64.b64encode(b"user:pa:ss").decode()
    raw = json.dumps({"auths": {"https://r.io": {"auth": encoded}, "docker.io": {"username": "u", "password": "p"}}})
    assert docker_config_auths(raw.encode()) == {"r.io": ("user", "pa:ss"), "registry-1.docker.io": ("u", "p")}


def test_the_registry_client_answers_a_bearer_challenge() -> None:
    """A 401 with a Bearer challenge: the token comes from the realm (with the credentials), then the call."""
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("Authorization")))
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "T"})
        if request.headers.get("Authorization") != "Bearer T":
            challenge = 'Bearer realm="https://r.io/token",service="r.io",scope="repository:a:pull"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(
            200, content=b"{}", headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        )

    registry = Registry("r.io", credentials=("u", "p"), transport=httpx.MockTransport(handler))
    body, media_type, digest = registry.manifest("a", "v1")
    assert body == b"{}" and media_type.endswith("manifest.v1+json") and digest.startswith("sha256:")
    assert [path for path, _ in seen] == ["/v2/a/manifests/v1", "/token", "/v2/a/manifests/v1"]
    assert seen[1][1] == httpx.BasicAuth("u", "p")._auth_header


def test_an_upload_keeps_the_query_of_its_location() -> None:
    """The registry's upload URL carries its state (`_state=`): the PUT adds the digest to it (httpx's
    `params` would replace it: distribution answers 404 BLOB_UPLOAD_INVALID)."""
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url)))
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/a/blobs/uploads/u1?_state=S"})
        if request.method == "PATCH":
            return httpx.Response(202, headers={"Location": "/v2/a/blobs/uploads/u1?_state=T"})
        return httpx.Response(201)

    registry = Registry("r.io", transport=httpx.MockTransport(handler))
    registry.upload("a", "sha256:d1", io.BytesIO(b"layer"), 5)
    registry.upload("a", "sha256:d2", iter([b"con", b"fig"]), None)
    puts = [url for method, url in seen if method == "PUT"]
    assert puts == [
        "https://r.io/v2/a/blobs/uploads/u1?_state=S&digest=sha256:d1",
        "https://r.io/v2/a/blobs/uploads/u1?_state=T&digest=sha256:d2",
    ]
