"""The committer: what runs in the short-lived pod the kubernetes runtime starts on a sandbox pod's
node to snapshot it (`opensandbox-server commit-snapshot`, the job in $OSB_COMMIT_JOB).

It runs privileged with the host's PID namespace, and:

1. finds the sandbox container's init process (the process in the container's cgroup whose parent
   is not: the runtime's shim) from the container id the pod status names;
2. reads the overlay's `upperdir` (the container's writable layer) from that process's mountinfo,
   and reaches it through the shim's `/proc/PID/root` (the node's mount namespace, where the path
   is valid: no hostPath volume of the node's root is needed);
3. freezes the container's cgroup (v1 `freezer.state`, v2 `cgroup.freeze`) while the layer is read
   with runtimes/filetree.py (by descriptors, never following a link the sandbox planted, device
   nodes left out, the sum of apparent sizes bounded before a byte is read), contents spooled
   into the pod's scratch volume; thaws it;
4. writes the entries as one layer (runtimes/oci_layer.py) over the image the pod runs (the digest
   its status names) and pushes config, layer and manifest to the snapshot repository, mounting
   or copying the base image's layers there.

The outcome is one JSON line on the pod's termination message (and stdout): the server reads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from opensandbox_platform.execd.isolated.layout import unescape
from opensandbox_platform.server.runtimes import filetree, oci_layer
from opensandbox_platform.server.runtimes import snapshots as snaps
from opensandbox_platform.server.runtimes.oci_registry import Reference, Registry, RegistryError, docker_config_auths

JOB_ENV = "OSB_COMMIT_JOB"
TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4000  # the kubelet keeps 4096 bytes of a termination message
FREEZE_TIMEOUT = 10.0


class CommitFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def stop_on_sigterm() -> None:
    """SIGTERM (the pod's activeDeadlineSeconds, or its deletion) unwinds the committer like a failure,
    so that `frozen` thaws the container: by default it would end the process on the spot (it is not
    PID 1: the pod shares the host's PID namespace) and leave the sandbox frozen."""

    def stopped(signum: int, _frame: object) -> None:
        raise CommitFailed(snaps.CAPTURE_FAILED, "the committer was stopped (its deadline passed or its pod went)")

    signal.signal(signal.SIGTERM, stopped)


@dataclass(frozen=True)
class Job:
    snapshot_id: str
    container_id: str  # without the runtime's scheme (containerd://)
    base_image: str  # what the pod's status says it runs: REGISTRY/REPO@sha256:...
    repository: str  # REGISTRY/REPO the snapshot is pushed to, tagged with its id
    max_bytes: int
    max_entries: int
    scratch: str = "/scratch"
    ca_pem: str = ""
    auth_file: str = ""  # a .dockerconfigjson (the snapshot registry's Secret, mounted)
    proc: str = "/proc"
    thaw_only: bool = False  # the rescue after a committer died without its outcome: thaw, nothing else

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(**data)


# --- finding the container (pure over a /proc tree) ----------------------------------------------
def container_pids(proc: str, container_id: str) -> dict[int, int]:
    """pid -> ppid of every process whose cgroup names the container."""
    found: dict[int, int] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if container_id in Path(proc, name, "cgroup").read_text():
                found[int(name)] = _ppid(Path(proc, name, "stat").read_text())
    return found


def _ppid(stat_line: str) -> int:
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it
    return int(stat_line.rsplit(")", 1)[1].split()[1])


def init_pid(pids: dict[int, int]) -> int:
    """The container's first process: the one whose parent is outside it (the shim)."""
    roots = sorted(pid for pid, ppid in pids.items() if ppid not in pids)
    if not roots:
        raise CommitFailed(snaps.CAPTURE_FAILED, "the sandbox container has no running process on its node")
    return roots[0]


def upper_dir(mountinfo: str) -> str:
    """The `upperdir` of the overlay mounted at / in this mountinfo."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or fields[4] != "/":
            continue
        fstype, _source, options = [*right.split(" ", 2), "", ""][:3]
        if fstype != "overlay":
            raise CommitFailed(snaps.CAPTURE_FAILED, f"the container's root is {fstype}, not an overlay")
        for option in options.split(","):
            if option.startswith("upperdir="):
                return unescape(option.removeprefix("upperdir="))
    raise CommitFailed(snaps.CAPTURE_FAILED, "the container's root overlay has no upperdir")


def freezer_file(cgroup_text: str) -> tuple[str, str, str]:
    """(file relative to /sys/fs/cgroup, the value that freezes, the value that thaws): the v1
    freezer when the process is in one, else cgroup v2's cgroup.freeze."""
    unified = None
    for line in cgroup_text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return f"freezer{path}/freezer.state", "FROZEN", "THAWED"
        if controllers == "":
            unified = path
    if unified is None:
        raise CommitFailed(snaps.CAPTURE_FAILED, "the container has no freezer cgroup")
    return f"{unified.lstrip('/')}/cgroup.freeze", "1", "0"


def freezer(host_root: str, cgroup_text: str) -> tuple[Path, str, str]:
    """freezer_file under the node's /sys/fs/cgroup, reached through `host_root`."""
    relative, freeze, thaw = freezer_file(cgroup_text)
    return Path(host_root, "sys/fs/cgroup", relative), freeze, thaw


@contextlib.contextmanager
def frozen(host_root: str, cgroup_text: str) -> Iterator[None]:
    """The container stopped (every process) while the block runs; thawed whatever happens."""
    path, freeze, thaw = freezer(host_root, cgroup_text)
    path.write_text(freeze)
    try:
        if freeze == "FROZEN":  # v1: FREEZING until every task stopped
            deadline = time.monotonic() + FREEZE_TIMEOUT
            while path.read_text().strip() != "FROZEN":
                if time.monotonic() > deadline:
                    raise CommitFailed(snaps.CAPTURE_FAILED, f"the container did not freeze in {FREEZE_TIMEOUT:g}s")
                time.sleep(0.01)
        yield
    finally:
        # A second SIGTERM must not interrupt the thaw itself.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            path.write_text(thaw)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# --- the spool: file contents between the capture and the layer -------------------------------
class Spool:
    """Content-addressed files in the scratch volume (two names of one content are stored once)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def put(self, source: BinaryIO, size: int) -> tuple[str, int]:
        sha, stored = hashlib.sha256(), 0
        partial = self.directory / f".partial-{os.getpid()}"
        with partial.open("wb") as out:
            while stored < size and (chunk := source.read(min(filetree.CHUNK, size - stored))):
                out.write(chunk)
                sha.update(chunk)
                stored += len(chunk)
        digest = sha.hexdigest()
        partial.replace(self.directory / digest)
        return digest, stored

    def open(self, digest: str) -> BinaryIO:
        return (self.directory / digest).open("rb")


# --- the whole job -------------------------------------------------------------------------------
def locate(job: Job) -> tuple[int, str]:
    """The container's first process and the node's root as its shim sees it (/proc/SHIM/root: the
    node's mount namespace); CommitFailed when the container has no process on this node."""
    pids = container_pids(job.proc, job.container_id)
    init = init_pid(pids)
    return init, f"{job.proc}/{pids[init]}/root"


def capture(job: Job) -> tuple[filetree.Captured, Spool]:
    init, host_root = locate(job)
    upper = upper_dir(Path(job.proc, str(init), "mountinfo").read_text())
    cgroup_text = Path(job.proc, str(init), "cgroup").read_text()
    spool = Spool(Path(job.scratch, "blobs"))
    budget = filetree.Budget(job.max_bytes, job.max_entries)
    with frozen(host_root, cgroup_text):
        try:
            captured = filetree.capture(host_root + upper, spool.put, budget, overlay=True)
        except filetree.TooLarge as exc:
            raise CommitFailed(snaps.TOO_LARGE, f"the sandbox's files are too large to snapshot: {exc}") from None
    return captured, spool


def push(job: Job, captured: filetree.Captured, spool: Spool) -> str:
    """Write the layer and push the image; returns `REPOSITORY@DIGEST`."""
    layer_path = Path(job.scratch, "layer.tar")
    with layer_path.open("wb") as out:
        layer, reserved = oci_layer.write_layer(captured.entries, spool.open, out)
    captured.skipped.extend(reserved)
    shutil.rmtree(spool.directory, ignore_errors=True)
    ca_file = ""
    if job.ca_pem:
        ca_file = str(Path(job.scratch, "ca.crt"))
        Path(ca_file).write_text(job.ca_pem)
    auths = docker_config_auths(Path(job.auth_file).read_bytes()) if job.auth_file else {}
    base, target = Reference.parse(job.base_image), Reference.parse(job.repository)
    if not base.digest:
        raise CommitFailed(
            snaps.CAPTURE_FAILED,
            f"the sandbox's image {job.base_image} is not from a registry (no digest): a snapshot is a layer over it"
            " and needs its layers in a registry",
        )
    with (
        Registry(target.registry, ca_file=ca_file, credentials=auths.get(target.registry)) as dest,
        Registry(base.registry, ca_file=ca_file, credentials=auths.get(base.registry)) as source,
    ):
        manifest, _ = source.image_manifest(base.repository, base.digest)
        config = json.loads(source.blob(base.repository, manifest["config"]["digest"]))
        layers = oci_layer.base_layers(manifest)
        for blob in layers:
            if dest.has_blob(target.repository, blob.digest):
                continue
            if base.registry == target.registry and dest.mount(target.repository, blob.digest, base.repository):
                continue
            dest.upload(target.repository, blob.digest, source.stream_blob(base.repository, blob.digest), None)
        config_body = oci_layer.image_config(
            config, layer, dt.datetime.now(dt.UTC), f"opensandbox snapshot {job.snapshot_id}"
        )
        config_desc = oci_layer.descriptor_of(config_body, oci_layer.OCI_CONFIG)
        dest.upload(target.repository, config_desc.digest, iter([config_body]), None)
        with layer_path.open("rb") as blob_file:
            dest.upload(target.repository, layer.digest, blob_file, layer.size)
        manifest_body = oci_layer.image_manifest(
            config_desc, [*layers, layer], {"io.opensandbox.snapshot": job.snapshot_id}
        )
        digest = dest.put_manifest(target.repository, job.snapshot_id, manifest_body, oci_layer.OCI_MANIFEST)
    layer_path.unlink(missing_ok=True)
    return f"{target.registry}/{target.repository}@{digest}"


def thaw(job: Job) -> dict[str, Any]:
    """Thaw the container a committer may have left frozen: one killed (SIGKILL: its memory limit, node
    pressure) inside `frozen` never ran its `finally`. A container that is gone needs nothing."""
    try:
        init, host_root = locate(job)
    except CommitFailed:
        return {"ok": True, "thawed": False}
    path, _, thawed = freezer(host_root, Path(job.proc, str(init), "cgroup").read_text())
    path.write_text(thawed)
    return {"ok": True, "thawed": True}


def run(job: Job) -> dict[str, Any]:
    """The outcome as the server reads it: `{"ok": true, image, files, bytes, skipped}` or
    `{"ok": false, reason, message}`; for a thaw-only job, `{"ok": true, "thawed": bool}`."""
    try:
        if job.thaw_only:
            return thaw(job)
        captured, spool = capture(job)
        image = push(job, captured, spool)
    except CommitFailed as exc:
        return {"ok": False, "reason": exc.reason, "message": str(exc)[: MESSAGE_LIMIT // 2]}
    except RegistryError as exc:
        return {"ok": False, "reason": snaps.CAPTURE_FAILED, "message": f"the registry refused the push: {exc}"}
    except OSError as exc:
        return {"ok": False, "reason": snaps.CAPTURE_FAILED, "message": f"the capture failed: {exc}"}
    files = sum(1 for e in captured.entries if e.kind == filetree.FILE)
    return {"ok": True, "image": image, "files": files, "bytes": captured.bytes, "skipped": len(captured.skipped)}


def main() -> int:
    stop_on_sigterm()
    job = Job.from_json(json.loads(os.environ[JOB_ENV]))
    try:
        outcome = run(job)
    except Exception as exc:  # a bug must still end the snapshot with a reason, not a bare exit code
        outcome = {"ok": False, "reason": snaps.CAPTURE_FAILED, "message": f"the committer failed: {exc!r}"}
    if "message" in outcome:
        outcome["message"] = str(outcome["message"])[: MESSAGE_LIMIT // 2]  # the line stays whole JSON
    line = json.dumps(outcome)
    print(line, flush=True)
    with contextlib.suppress(OSError):
        Path(TERMINATION_LOG).write_text(line)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
