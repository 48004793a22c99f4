"""Escape attempts by the tenant: each must fail (docs/security.md has the table per runtime).

The tenant is a sandbox whose code is the attacker (tests/security/conftest.py); every case tries
one thing with the probe (tests/security/probe.c) and checks both what the tenant saw and, where
there is one, the canary on the host side (a listener that must have accepted nothing, a file or
process that must be unchanged).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
from opensandbox.models.execd import RunCommandOpts

from tests.security.conftest import Canaries, Tenant, host_process_alive
from tests.security.targets import METADATA, Target


def refused(output: str) -> bool:
    return output.startswith("ERR ")


def assert_untouched(canaries: Canaries, *names: str) -> None:
    touched = {name: peers for name, peers in canaries.touched().items() if name in names}
    assert not touched, f"canary listeners accepted connections: {touched}"


# -- files -------------------------------------------------------------------------------------------


def test_cannot_read_a_secret_in_the_hosts_root_home(tenant: Tenant, canaries: Canaries) -> None:
    output = tenant.probe("read", str(canaries.files["root"]))
    assert refused(output) and canaries.secret not in output


def test_cannot_read_a_secret_in_the_hosts_etc(tenant: Tenant, canaries: Canaries) -> None:
    output = tenant.probe("read", str(canaries.files["etc"]))
    assert refused(output) and canaries.secret not in output
    host_root = next((line for line in Path("/etc/shadow").read_text().splitlines() if line.startswith("root:")), None)
    if host_root:  # the host's password hashes (an image may have a /etc/shadow of its own)
        assert host_root not in tenant.probe("read", "/etc/shadow")


def test_cannot_read_a_secret_in_the_servers_state_dir(tenant: Tenant, canaries: Canaries) -> None:
    output = tenant.probe("read", str(canaries.files["state"]))
    assert refused(output) and canaries.secret not in output


def test_cannot_see_the_hosts_home_and_work_directories(tenant: Tenant) -> None:
    """What is in the host's /root, /home, /work, /srv, /mnt, /opt (an image's own files aside)."""
    for directory in ("/root", "/home", "/work", "/srv", "/mnt", "/opt"):
        host = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        _, lines = tenant.sh(f"ls -A {directory} 2>/dev/null; true")
        shown = set(lines) - {""}
        common = {".bashrc", ".profile", ".cache", ".config", ".local", "opensandbox"}  # what images have too
        assert not (shown & host) - common, f"{directory}: {sorted((shown & host) - common)}"


def test_cannot_read_another_sandboxs_files(tenant: Tenant, canaries: Canaries) -> None:
    victim = canaries.victim
    assert victim.sandbox.files.read_file(victim.path) == victim.secret  # it is there...
    output = tenant.probe("read", victim.path)
    assert victim.secret not in output  # ...but not for the tenant
    places = "/tmp /root /home /workspace /var /run /srv /mnt /etc"
    _, lines = tenant.sh(f"grep -rl {victim.secret} {places} 2>/dev/null | head -3; true", timeout=120)
    assert not [line for line in lines if line.strip()], lines


# -- processes ---------------------------------------------------------------------------------------


def test_cannot_list_host_processes(tenant: Tenant, canaries: Canaries) -> None:
    output = tenant.probe("pids")
    processes = dict(line.split(" ", 1) for line in output.splitlines() if line[:1].isdigit() and " " in line)
    assert "sleep" not in processes.values(), processes  # the host's canary process
    assert len(processes) < 20, f"{len(processes)} processes visible: {processes}"


def test_cannot_signal_a_host_process(tenant: Tenant, canaries: Canaries) -> None:
    output = tenant.probe("kill", str(canaries.process.pid))
    assert refused(output)
    assert host_process_alive(canaries.process.pid)


def test_cannot_ptrace_a_process_outside(tenant: Tenant, canaries: Canaries) -> None:
    assert refused(tenant.probe("ptrace", str(canaries.process.pid)))
    assert host_process_alive(canaries.process.pid)


# -- network -----------------------------------------------------------------------------------------


def test_cannot_connect_to_a_listener_on_the_hosts_loopback(tenant: Tenant, canaries: Canaries, target: Target) -> None:
    port = str(canaries.listeners["loopback"].port)
    for host in ("127.0.0.1", target.gateway):
        assert "CANARY" not in tenant.probe("connect", host, port)
    assert_untouched(canaries, "loopback")


def test_cannot_connect_to_a_listener_on_the_hosts_own_address(tenant: Tenant, canaries: Canaries) -> None:
    listener = canaries.listeners["host"]
    assert "CANARY" not in tenant.probe("connect", listener.host, str(listener.port))
    assert_untouched(canaries, "host")


def test_cannot_connect_to_a_listener_on_the_hosts_bridge_address(tenant: Tenant, canaries: Canaries) -> None:
    listener = canaries.listeners.get("bridge") or canaries.listeners["host"]
    assert "CANARY" not in tenant.probe("connect", listener.host, str(listener.port))
    assert_untouched(canaries, "bridge", "host")


def test_cannot_reach_the_servers_api(tenant: Tenant, canaries: Canaries, target: Target) -> None:
    request = f"GET /v1/sandboxes HTTP/1.0|Host: {target.domain}||"
    for host in ("127.0.0.1", target.gateway, canaries.listeners["host"].host):
        output = tenant.probe("connect", host, str(target.server_port), request)
        assert "HTTP/1" not in output, f"{host}: {output}"


def test_cannot_reach_the_cloud_metadata_address(tenant: Tenant, canaries: Canaries, target: Target) -> None:
    with target.metadata_route(tenant.sandbox.id, canaries.listeners["metadata"].port):
        output = tenant.probe("connect", METADATA, "80", "GET /latest/meta-data/ HTTP/1.0||")
    assert "CANARY" not in output
    assert_untouched(canaries, "metadata")


def _execd_command(address: str, token: str | None) -> int:
    """What a client of `address` gets when it asks execd to run a command (its HTTP status)."""
    headers = {"X-EXECD-ACCESS-TOKEN": token} if token else {}
    with httpx.Client(timeout=10) as client:
        return client.post(f"http://{address}/command", json={"command": "true"}, headers=headers).status_code


def test_cannot_run_commands_in_the_second_sandbox_without_its_token(tenant: Tenant, canaries: Canaries) -> None:
    victim = canaries.victim
    assert _execd_command(victim.execd, victim.token) == 200  # the endpoint works, with the token
    assert _execd_command(victim.execd, None) == 401  # and refuses anyone without it
    for address in filter(None, [victim.execd, victim.address]):
        host, port = address.rsplit(":", 1)
        request = "POST /command HTTP/1.0|Content-Type: application/json|Content-Length: 19||" + '{"command": "true"}'
        output = tenant.probe("connect", host, port, request)
        assert " 200 " not in output, f"{address}: {output}"


def test_cannot_reach_the_second_sandboxs_execd_even_with_its_token(tenant: Tenant, canaries: Canaries) -> None:
    """A leaked token must still not let one sandbox drive another: it cannot even connect."""
    victim = canaries.victim
    for address in filter(None, [victim.execd, victim.address]):
        host, port = address.rsplit(":", 1)
        request = f"GET /ping HTTP/1.0|X-EXECD-ACCESS-TOKEN: {victim.token}||"
        output = tenant.probe("connect", host, port, request)
        assert not output.startswith("ok connected"), f"{address}: {output}"


def test_cannot_open_raw_or_packet_sockets(tenant: Tenant) -> None:
    assert refused(tenant.probe("raw-inet"))
    assert refused(tenant.probe("raw-packet"))  # no ARP spoofing on a bridge


# -- the kernel ----------------------------------------------------------------------------------


def test_cannot_mount(tenant: Tenant) -> None:
    assert refused(tenant.probe("mount"))
    assert refused(tenant.probe("mount-proc"))


def test_cannot_unshare_namespaces(tenant: Tenant) -> None:
    for kind in ("unshare-user", "unshare-mount", "unshare-net"):
        assert refused(tenant.probe(kind)), kind


def test_cannot_setns(tenant: Tenant) -> None:
    for path in ("/proc/1/ns/mnt", "/proc/1/ns/net", "/proc/self/ns/user"):
        assert refused(tenant.probe("setns", path)), path


def test_cannot_load_a_kernel_module(tenant: Tenant) -> None:
    assert refused(tenant.probe("module"))
    assert refused(tenant.probe("finit-module"))
    assert refused(tenant.probe("kexec"))


def test_cannot_write_proc_sys(tenant: Tenant) -> None:
    before = open("/proc/sys/kernel/hostname").read()  # noqa: SIM115 - read once
    assert refused(tenant.probe("write", "/proc/sys/kernel/hostname", "pwned"))
    assert refused(tenant.probe("write", "/proc/sys/vm/drop_caches", "3"))
    assert refused(tenant.probe("write", "/proc/sysrq-trigger", "h"))
    assert open("/proc/sys/kernel/hostname").read() == before  # noqa: SIM115


def test_cannot_create_a_device_node(tenant: Tenant) -> None:
    assert refused(tenant.probe("mknod", "/tmp/disk"))


def test_cannot_change_the_hosts_clock_or_hostname(tenant: Tenant) -> None:
    hostname = socket.gethostname()
    assert refused(tenant.probe("settime"))
    assert refused(tenant.probe("sethostname", "pwned"))
    assert socket.gethostname() == hostname


def test_cannot_use_keyrings_bpf_or_perf_events(tenant: Tenant) -> None:
    for kind in ("keyctl", "bpf", "perf"):
        assert refused(tenant.probe(kind)), kind


def test_a_setuid_binary_gives_no_privileges(tenant: Tenant, canaries: Canaries) -> None:
    """A setuid-root program in the sandbox, run by an unprivileged user of it: no root, let alone the host's."""
    code, lines = tenant.sh(
        "cp /tmp/probe /tmp/suid && chown 0:0 /tmp/suid && chmod 4755 /tmp/suid && ls -ln /tmp/suid"
    )
    assert code == 0 and lines[0].startswith("-rwsr-xr-x"), lines
    nobody = RunCommandOpts(uid=65534, gid=65534)
    run = tenant.sandbox.commands.run("/tmp/suid ids; /tmp/suid read " + str(canaries.files["root"]), opts=nobody)
    output = [m.text for m in run.logs.stdout]
    assert output[0] == "ok ruid=65534 euid=65534", output  # no_new_privs: the setuid bit is ignored
    assert canaries.secret not in " ".join(output)


def test_holds_no_kubernetes_credentials(tenant: Tenant) -> None:
    """A pod's ServiceAccount token would let the tenant talk to the Kubernetes API as that account:
    sandbox pods get none (automountServiceAccountToken: false), and no other runtime has one either."""
    _, lines = tenant.sh("ls /var/run/secrets/kubernetes.io/serviceaccount/ 2>&1")
    assert not any(line.strip() in ("token", "ca.crt", "namespace") for line in lines), lines
