"""The docker runtime's pure logic: labels, state mapping, the container's config, overrides."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from opensandbox_platform.api import labels as L
from opensandbox_platform.server.config import Config, DockerSection, load
from opensandbox_platform.server.runtimes import docker_model as model
from opensandbox_platform.server.runtimes.base import SandboxSpec, State
from opensandbox_platform.server.runtimes.docker import _dir_tar, _rerooted_tar

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def spec(**overrides: object) -> SandboxSpec:
    values: dict[str, object] = {
        "image": "localhost/img:1",
        "entrypoint": ["python", "app.py"],
        "env": {"A": "1"},
        "metadata": {"team": "t1", "example.com/x": "y"},
        "extensions": {"e": "v"},
        "timeout_seconds": 600,
    }
    values.update(overrides)
    return SandboxSpec(**values)  # type: ignore[arg-type]


def test_labels_round_trip() -> None:
    labels = model.encode_labels("sb-1", spec(), NOW)
    assert labels[L.DOCKER_ID] == "sb-1"
    assert labels[L.DOCKER_EXPIRES_AT] == "2030-01-02T03:14:05.123456Z"
    assert L.DOCKER_MANUAL_CLEANUP not in labels
    assert labels[L.DOCKER_METADATA_PREFIX + "example.com/x"] == "y"
    # An image's own labels are in the container's labels too: they are not metadata.
    decoded = model.decode_labels({**labels, "org.opencontainers.image.version": "1"})
    assert decoded == model.Labels(
        id="sb-1",
        image="localhost/img:1",
        entrypoint=["python", "app.py"],
        created_at=NOW,
        expires_at=NOW + dt.timedelta(minutes=10),
        metadata={"team": "t1", "example.com/x": "y"},
        extensions={"e": "v"},
    )


def test_no_timeout_is_manual_cleanup() -> None:
    labels = model.encode_labels("sb-1", spec(timeout_seconds=None), NOW)
    assert labels[L.DOCKER_MANUAL_CLEANUP] == "true" and L.DOCKER_EXPIRES_AT not in labels
    decoded = model.decode_labels(labels)
    assert decoded is not None and decoded.expires_at is None


@pytest.mark.parametrize(
    "labels",
    [{}, {"other": "x"}, {L.DOCKER_ID: "a"}, {L.DOCKER_ID: "a", L.DOCKER_CREATED_AT: "not a time"}],
    ids=["none", "foreign", "no created-at", "bad created-at"],
)
def test_foreign_or_damaged_labels_are_not_a_sandbox(labels: dict[str, str]) -> None:
    assert model.decode_labels(labels) is None


STATES = [
    ({"Status": "running"}, (State.RUNNING, "CONTAINER_RUNNING")),
    ({"Status": "running", "Paused": True}, (State.PAUSED, "CONTAINER_PAUSED")),
    ({"Status": "paused"}, (State.PAUSED, "CONTAINER_PAUSED")),
    ({"Status": "restarting"}, (State.RUNNING, "CONTAINER_RESTARTING")),
    ({"Status": "created"}, (State.PENDING, "CONTAINER_STARTING")),
    ({"Status": "exited", "ExitCode": 0}, (State.TERMINATED, "CONTAINER_EXITED")),
    ({"Status": "exited", "ExitCode": 3}, (State.FAILED, "CONTAINER_EXITED_ERROR")),
    ({"Status": "exited", "ExitCode": 137, "OOMKilled": True}, (State.FAILED, "CONTAINER_OOM_KILLED")),
    ({"Status": "dead", "ExitCode": 0}, (State.TERMINATED, "CONTAINER_EXITED")),
    ({"Status": "removing", "ExitCode": 137}, (State.STOPPING, "CONTAINER_REMOVING")),
    ({"Status": "weird"}, ("Unknown", "CONTAINER_STATE_UNKNOWN")),
]


@pytest.mark.parametrize(("state", "expected"), STATES, ids=[str(s[0]) for s in STATES])
def test_state_mapping_from_inspect(state: dict[str, object], expected: tuple[str, str]) -> None:
    api_state, reason, _ = model.map_state(model.ContainerState.from_inspect(state))
    assert (api_state, reason) == expected


def test_failed_message_names_the_exit_code_and_times_are_parsed() -> None:
    state = model.ContainerState.from_inspect(
        {"Status": "exited", "ExitCode": 3, "FinishedAt": "2030-01-02T03:04:05.123456789Z", "StartedAt": "x"}
    )
    assert model.map_state(state)[2] == "the entrypoint exited with code 3"
    assert state.changed_at == NOW
    never = model.ContainerState.from_inspect({"Status": "created", "StartedAt": "0001-01-01T00:00:00Z"})
    assert never.changed_at is None


def test_a_sandbox_being_deleted_is_stopping_and_one_without_execd_is_failed() -> None:
    labels = model.Labels("sb", "img", ["true"], NOW, None)
    killed = model.ContainerState("exited", exit_code=137)
    deleting = model.sandbox_info(labels, killed, None, {}, deleting=True)
    assert (deleting.state, deleting.reason) == (State.STOPPING, "DELETING")
    running = model.ContainerState("running")
    dead = model.sandbox_info(labels, running, None, {}, execd_dead="connection refused")
    assert (dead.state, dead.reason) == (State.FAILED, "EXECD_UNREACHABLE") and "connection refused" in dead.message
    exited = model.sandbox_info(labels, model.ContainerState("exited", exit_code=0), None, {}, execd_dead="gone")
    assert exited.state == State.TERMINATED  # the container's own end says more than the probe


def test_state_from_the_list_reads_the_exit_code_from_the_status_text() -> None:
    state = model.ContainerState.from_list({"State": "exited", "Status": "Exited (3) 2 seconds ago"})
    assert model.map_state(state)[:2] == (State.FAILED, "CONTAINER_EXITED_ERROR")
    assert model.ContainerState.from_list({"State": "running", "Status": "Up 3 seconds"}).exit_code is None


def test_container_config_from_a_spec() -> None:
    settings = DockerSection(network="sandboxes", oci_runtime="runsc", pids_limit=100)
    labels = model.encode_labels("sb-1", spec(), NOW)
    body = model.container_config(
        "sb-1",
        spec(env={"A": "1", "EXECD_ACCESS_TOKEN": "forged"}),
        token="tok",
        labels=labels,
        working_dir="/workspace",
        settings=settings,
        cpu_millis=500,
        memory_bytes=256 << 20,
        execd_volume="opensandbox-execd-abc",
    )
    assert body["Image"] == "localhost/img:1"
    assert body["Entrypoint"] == ["/opt/opensandbox/bin/bootstrap.sh"] and body["Cmd"] == ["python", "app.py"]
    assert body["Hostname"] == "sb-1" and body["WorkingDir"] == "/workspace" and body["Labels"] == labels
    env = dict(e.split("=", 1) for e in body["Env"])
    assert env["A"] == "1" and env["EXECD_ACCESS_TOKEN"] == "tok"  # the request cannot replace the token
    assert env["EXECD"] == "/opt/opensandbox/bin/execd" and env["OPENSANDBOX_ID"] == "sb-1"
    assert env["EXECD_ENVS"] == "/opt/opensandbox/.env"  # beside the read-only volume, in the container's own files
    host = body["HostConfig"]
    # execd comes in the create itself: one shared volume, read-only (no archive upload per sandbox)
    assert host["Mounts"] == [
        {"Type": "volume", "Source": "opensandbox-execd-abc", "Target": "/opt/opensandbox/bin", "ReadOnly": True}
    ]
    assert host["PortBindings"] == {"44772/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert host["CapDrop"] == ["ALL"] and "CAP_NET_RAW" not in host["CapAdd"] and "CAP_SETUID" in host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"] and host["PidsLimit"] == 100
    assert host["Memory"] == host["MemorySwap"] == 256 << 20 and host["NanoCpus"] == 500_000_000
    assert host["NetworkMode"] == "sandboxes" and host["Runtime"] == "runsc"


def test_no_limits_no_network_no_runtime_by_default() -> None:
    body = model.container_config(
        "sb-1",
        spec(),
        token="t",
        labels={},
        working_dir="/",
        settings=DockerSection(),
        cpu_millis=None,
        memory_bytes=None,
        execd_volume="v",
    )
    assert not {"Memory", "NanoCpus", "NetworkMode", "Runtime"} & set(body["HostConfig"])


def test_inspect_helpers() -> None:
    inspect = {
        "Config": {"Env": ["PATH=/bin", "EXECD_ACCESS_TOKEN=a=b"]},
        "NetworkSettings": {
            "Ports": {"44772/tcp": [{"HostIp": "127.0.0.1", "HostPort": "40001"}]},
            "IPAddress": "",
            "Networks": {"podman": {"IPAddress": "10.88.0.5"}},
        },
    }
    assert model.published_port(inspect) == 40001 and model.published_port({}) is None
    assert model.container_ip(inspect) == "10.88.0.5"
    assert model.env_value(inspect, "EXECD_ACCESS_TOKEN") == "a=b" and model.env_value(inspect, "X") == ""


def test_endpoint_host() -> None:
    assert model.endpoint_host(DockerSection()) == "127.0.0.1"
    assert model.endpoint_host(DockerSection(publish_host="0.0.0.0")) == "127.0.0.1"
    assert model.endpoint_host(DockerSection(publish_host="10.0.0.2")) == "10.0.0.2"
    assert model.endpoint_host(DockerSection(publish_host="0.0.0.0", endpoint_host="sb.example")) == "sb.example"


def test_program_candidates() -> None:
    assert model.program_candidates("/bin/app", "/w", "/x") == ["/bin/app"]
    assert model.program_candidates("./app", "/w/", "/x") == ["/w/./app"]
    assert model.program_candidates("tail", "/w", "/a:/b/") == ["/a/tail", "/b/tail"]
    assert model.image_path(["PATH=/img"], {}) == "/img"
    assert model.image_path(["PATH=/img"], {"PATH": "/req"}) == "/req"


def test_override_store(tmp_path: Path) -> None:
    store = model.OverrideStore(tmp_path / "state")
    assert store.load("a") is None and store.ids() == set()
    store.save("a", model.Override(expires_at=NOW, metadata={"k": "v"}))
    store.save("b", model.Override(expires_at=None, metadata={}))
    assert store.load("a") == model.Override(expires_at=NOW, metadata={"k": "v"})
    assert store.ids() == {"a", "b"} and not list((tmp_path / "state").glob("*.tmp"))
    (tmp_path / "state" / "b.json").write_text("{broken")
    assert store.load("b") is None
    store.delete("a")
    store.delete("a")  # twice is fine
    assert store.ids() == {"b"}


def test_execd_dir_becomes_the_volume_archive_complete_last(tmp_path: Path) -> None:
    (tmp_path / "execd-lib" / "python3.11").mkdir(parents=True)
    (tmp_path / "execd").write_bytes(b"ELF")
    (tmp_path / "execd").chmod(0o755)
    (tmp_path / "bootstrap.sh").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "bootstrap.sh").chmod(0o755)
    (tmp_path / "execd-lib" / "libpython3.11.so.1.0").write_bytes(b"lib")
    data = _dir_tar(tmp_path)
    os.utime(tmp_path / "execd", (1, 1))  # rebuilt: same content, other times
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(_dir_tar(tmp_path)).hexdigest()  # a stable name
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members)[-1] == model.EXECD_VOLUME_COMPLETE  # written last: a complete volume has it
        assert {"execd", "bootstrap.sh", "execd-lib", "execd-lib/libpython3.11.so.1.0"} <= set(members)
        assert all(m.uid == 0 and m.gid == 0 for m in members.values())
        assert members["execd"].mode & 0o777 == 0o755
        extracted = tar.extractfile(members["execd"])
        assert extracted is not None and extracted.read() == b"ELF"
    assert_ends_at_its_end_blocks(data)
    (tmp_path / "bootstrap.sh").unlink()
    with pytest.raises(RuntimeError, match=r"bootstrap\.sh"):
        _dir_tar(tmp_path)


def assert_ends_at_its_end_blocks(data: bytes) -> None:
    """No padding after the two zero blocks: podman's PUT archive fails on it (containers/buildah#6573)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    end_of_last = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    assert len(data) == end_of_last + 2 * tarfile.BLOCKSIZE
    assert data[end_of_last:] == bytes(2 * tarfile.BLOCKSIZE)


def test_execd_image_archive_rerooted_at_the_volume() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("opensandbox/", None), ("opensandbox/execd", b"ELF"), ("opensandbox/bootstrap.sh", b"#")):
            info = tarfile.TarInfo(name.rstrip("/"))
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as archive:
        data = _rerooted_tar(archive)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["execd", "bootstrap.sh", model.EXECD_VOLUME_COMPLETE]
    assert_ends_at_its_end_blocks(data)
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    empty.seek(0)
    with tarfile.open(fileobj=empty) as archive, pytest.raises(ValueError):
        _rerooted_tar(archive)


def test_execd_volume_name() -> None:
    assert model.execd_volume_name("0123456789abcdef0123") == "opensandbox-execd-0123456789abcdef"


def test_docker_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[docker]\npublishHost = "0.0.0.0"\npullTimeoutSeconds = 5\ndefaultMemory = "1Gi"\n')
    config = load(path)
    assert config.docker.publish_host == "0.0.0.0" and config.docker.pull_timeout_seconds == 5
    path.write_text('[docker]\nexecdDir = "/x"\n')
    assert load(path).docker.execd_dir == "/x"
    assert Config().docker.state_path().name == "docker"
    assert json.dumps(Config().docker.model_dump())  # every key has a plain default


def test_seccomp_option_builtin_default_or_a_path(tmp_path: Path) -> None:
    path = tmp_path / "seccomp.json"
    assert model.seccomp_option("default", False, path) == ("", None)
    assert model.seccomp_option("/etc/profile.json", True, path) == ("/etc/profile.json", None)
    assert model.seccomp_option("builtin", True, path) == (str(path), str(path))  # podman reads a file
    inline, write = model.seccomp_option("builtin", False, path)  # Docker takes the profile itself
    assert write is None and json.loads(inline)["defaultAction"] == "SCMP_ACT_ERRNO"


def test_seccomp_option_for_isolated_sessions(tmp_path: Path) -> None:
    path = tmp_path / "seccomp-userns.json"
    inline, _ = model.seccomp_option("builtin", False, path, userns=True)
    names = {
        n for entry in json.loads(inline)["syscalls"] for n in entry["names"] if entry["action"] == "SCMP_ACT_ALLOW"
    }
    assert {"unshare", "mount", "pivot_root", "umount2"} <= names
    assert model.seccomp_option("default", True, path, userns=True) == ("", None)  # the engine's, as it is


def test_resource_requests_are_cpu_shares_and_a_memory_reservation() -> None:
    requested = spec()
    requested.cpu_request_millis, requested.memory_request_bytes = 250, 128 << 20
    body = model.container_config(
        "sb-1",
        requested,
        token="t",
        labels={},
        working_dir="/",
        settings=DockerSection(),
        cpu_millis=None,
        memory_bytes=None,
        execd_volume="v",
    )
    assert body["HostConfig"]["CpuShares"] == 256 and body["HostConfig"]["MemoryReservation"] == 128 << 20
    assert (
        "CpuShares"
        not in model.container_config(
            "sb-1",
            spec(),
            token="t",
            labels={},
            working_dir="/",
            settings=DockerSection(),
            cpu_millis=None,
            memory_bytes=None,
            execd_volume="v",
        )["HostConfig"]
    )


def test_secure_access_survives_in_the_labels_and_inspect_hides_the_token() -> None:
    wanted = spec()
    wanted.secure_access = True
    labels = model.encode_labels("sb-1", wanted, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    decoded = model.decode_labels(labels)
    assert decoded is not None and decoded.secure_access
    inspect = {"Id": "c1", "Config": {"Env": ["A=1", "EXECD_ACCESS_TOKEN=secret"]}, "State": {}}
    assert model.redacted_inspect(inspect)["Config"]["Env"] == ["A=1", "EXECD_ACCESS_TOKEN=<redacted>"]
    assert inspect["Config"]["Env"][1] == "EXECD_ACCESS_TOKEN=secret"  # the original is left alone


def test_container_events_tell_an_oom_kill_and_the_exit() -> None:
    inspect = {
        "Id": "abc",
        "Created": "2026-01-01T00:00:00.123456789Z",
        "State": {
            "Status": "exited",
            "StartedAt": "2026-01-01T00:00:01Z",
            "FinishedAt": "2026-01-01T00:00:09Z",
            "OOMKilled": True,
            "ExitCode": 137,
        },
    }
    reasons = [(e.reason, e.type) for e in model.container_events(inspect)]
    assert reasons == [
        ("ContainerCreated", "Normal"),
        ("ContainerStarted", "Normal"),
        ("OOMKilled", "Warning"),
        ("Exited", "Warning"),
    ]


def test_a_policy_holds_the_entrypoint_back_and_its_sidecar_alone_has_net_admin() -> None:
    policy = {"defaultAction": "deny", "egress": [{"action": "allow", "target": "*.good.test"}]}
    body = model.container_config(
        "sb-1",
        spec(network_policy=policy),
        token="t",
        labels={},
        working_dir="/",
        settings=DockerSection(),
        cpu_millis=None,
        memory_bytes=None,
        execd_volume="v",
    )
    assert f"{L.START_GATE_ENV}={L.START_GATE}" in body["Env"] and body["Labels"][L.DOCKER_EGRESS] == "true"
    assert "NET_ADMIN" not in body["HostConfig"]["CapAdd"]
    plain = model.container_config(
        "sb-1", spec(), token="t", labels={}, working_dir="/", settings=DockerSection(),
        cpu_millis=None, memory_bytes=None, execd_volume="v",
    )  # fmt: skip
    assert not any(e.startswith(L.START_GATE_ENV) for e in plain["Env"]) and L.DOCKER_EGRESS not in plain["Labels"]
    sidecar = model.egress_config("sb-1", "cid", policy, "tok", "egress:1", ["203.0.113.53"])
    host = sidecar["HostConfig"]
    assert host["NetworkMode"] == "container:cid" and host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["NET_ADMIN"]
    assert "PidMode" not in host  # its environment (the token) is not visible from the sandbox
    env = dict(e.split("=", 1) for e in sidecar["Env"])
    assert (
        json.loads(env["OPENSANDBOX_EGRESS_RULES"]) == policy and env["OPENSANDBOX_EGRESS_UPSTREAM"] == "203.0.113.53"
    )
    assert sidecar["Labels"] == {L.DOCKER_EGRESS_FOR: "sb-1"}
