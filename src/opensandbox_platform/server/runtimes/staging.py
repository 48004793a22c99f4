"""Starting a jail: the part that runs in a thread of its own, in namespaces of its own.

bwrap builds the jail's root from host paths, which it looks up as the sandbox's user (an
unprivileged host uid, runtimes/uidmap.py): it could not reach a server state dir under /root, nor
an interpreter in a 0700 home. So a fresh thread first makes a private mount namespace (nothing it
mounts is seen by the host) and a new network namespace, and prepares everything there:

- a tmpfs at `stage_dir`: `rw/`, the sandbox's writable root (a tmpfs of its own, `disk_bytes`
  big, owned by the sandbox's root, with the skeleton of runtimes/rootfs.py), and `rt/NAME`,
  read-only binds of what execd needs (the server's Python and this package);
- the network namespace: loopback up, its sysctls, the nftables ruleset (runtimes/netpolicy.py);

then starts bwrap there (as the sandbox's host uid: its user namespace maps the sandbox's root to
it), reads the jail's pid from `--info-fd` and writes the jail's uid/gid maps (a whole range,
which only a privileged process can). bwrap's child waits on `--userns-block-fd` until the caller
has finished (cgroups, slirp4netns) and lets it go. The thread then ends; the namespaces live on
with bwrap's processes, and vanish with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from opensandbox_platform.server.runtimes import linux, procfs
from opensandbox_platform.server.runtimes.rootfs import Entry
from opensandbox_platform.server.runtimes.uidmap import IdRange

T = TypeVar("T")


@dataclass
class StagePlan:
    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...]
    output_fd: int  # bwrap's stdout and stderr (a pipe the server drains into the jail's log)
    ids: IdRange
    stage_dir: str
    disk_bytes: int
    skeleton: list[Entry]
    mountpoints: list[tuple[str, bool]]  # paths in the root to create (True: a directory)
    runtime_binds: dict[str, str]  # staged name -> host path
    ruleset: str
    sysctls: dict[str, str]
    info_fd: int  # read end of bwrap's --info-fd
    timeout: float
    # An image's unpacked root: the lower layer of an overlay whose upper is the private tmpfs.
    image_root: str | None = None
    # Volumes: (detached mount of the host directory, read-only), attached at <stage>/vol/<i> idmapped to
    # the jail's user namespace before bwrap goes on (jail.bwrap_args binds them into the jail).
    volumes: list[tuple[int, bool]] = field(default_factory=list)
    # Called in the thread with the root's writable layer and the sandbox's first host id, once the
    # skeleton and mount points are there: lays a snapshot's files out (runtimes/local_snapshots.py).
    restore: Callable[[str, int], None] | None = field(default=None, repr=False)
    # Called in the thread with the jail's pid before its maps are written (the uid range's holder).
    on_pid: Callable[[int], None] | None = field(default=None, repr=False)


@dataclass
class Staged:
    popen: subprocess.Popen[bytes]
    pid: int  # host pid of the jail's first process (bwrap's child)
    netns_fd: int  # the jail's network namespace (the caller closes it)


def in_thread(function: Callable[[], T]) -> Future[T]:
    """Run `function` in a new thread (whose namespaces die with it); its result as a future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    threading.Thread(target=run, name="jail-stage", daemon=True).start()
    return future


def stage_and_start(plan: StagePlan) -> Staged:
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_FS | linux.CLONE_NEWNET)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    _stage_files(plan)
    _configure_network(plan)
    netns_fd = linux.thread_namespace("net")
    try:
        popen = _start(plan)
    except BaseException:
        os.close(netns_fd)
        raise
    try:
        pid = _read_child_pid(plan.info_fd, plan.timeout)
        if plan.on_pid is not None:
            plan.on_pid(pid)
        write_id_maps(pid, plan.ids)
        if plan.image_root is not None:
            _mount_image(plan, pid)
        if plan.volumes:
            _mount_volumes(plan, pid)
    except BaseException:
        os.close(netns_fd)
        kill_unreleased(popen)
        raise
    return Staged(popen, pid, netns_fd)


def _stage_files(plan: StagePlan) -> None:
    stage = plan.stage_dir
    linux.mount("opensandbox", stage, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,mode=0755")
    if plan.image_root is not None or plan.volumes:
        # The image's overlay and the volumes are mounted once bwrap's child exists (they need its
        # user namespace): shared, so that they reach the child's copy of this mount namespace.
        linux.mount(None, stage, None, linux.MS_SHARED)
    if plan.image_root is not None:
        for name in ("lower", "root"):
            os.mkdir(os.path.join(stage, name))
    for index in range(len(plan.volumes)):
        os.makedirs(os.path.join(stage, "vol", str(index)))
    rw = os.path.join(stage, "rw")
    os.mkdir(rw)
    inodes = max(plan.disk_bytes // 4096, 16384)
    options = f"size={plan.disk_bytes},nr_inodes={inodes},mode=0755,uid={plan.ids.start},gid={plan.ids.start}"
    linux.mount("opensandbox-rw", rw, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, options)
    owner = plan.ids.start
    top = rw
    if plan.image_root is not None:
        top = os.path.join(rw, "upper")
        os.mkdir(top, 0o755)
        os.chown(top, owner, owner)
        os.mkdir(os.path.join(rw, "work"), 0o700)
    for entry in plan.skeleton:
        _make(os.path.join(top, entry.path), entry, owner)
    for path, is_dir in plan.mountpoints:
        _mountpoint(top, path, is_dir, owner)
    if plan.restore is not None:
        plan.restore(top, owner)
    os.mkdir(os.path.join(stage, "rt"))
    for name, host_path in plan.runtime_binds.items():
        target = os.path.join(stage, "rt", name)
        os.mkdir(target)
        linux.bind_readonly(host_path, target)


def _make(path: str, entry: Entry, owner: int) -> None:
    if entry.content is None:
        os.makedirs(path, exist_ok=True)
    else:
        with open(path, "w") as f:
            f.write(entry.content)
    os.chown(path, owner, owner)
    os.chmod(path, entry.mode)


def _mountpoint(rw: str, path: str, is_dir: bool, owner: int) -> None:
    """Create `path` (and missing parents, 0755) in the root for bwrap to mount on."""
    parts = path.strip("/").split("/")
    current = rw
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        last = i == len(parts) - 1
        if os.path.lexists(current):
            continue
        if last and not is_dir:
            with open(current, "w"):
                pass
            os.chmod(current, 0o644)
        else:
            os.mkdir(current, 0o755)
        os.chown(current, owner, owner)


def _mount_image(plan: StagePlan, pid: int) -> None:
    """The jail's root: the image's root, idmapped to the jail's user namespace (the image's root
    is the jail's root), under the jail's private upper layer."""
    assert plan.image_root is not None
    stage = plan.stage_dir
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.bind_idmapped(plan.image_root, os.path.join(stage, "lower"), userns)
    finally:
        os.close(userns)
    layers = f"lowerdir={stage}/lower,upperdir={stage}/rw/upper,workdir={stage}/rw/work"
    linux.mount("opensandbox-image", os.path.join(stage, "root"), "overlay", linux.MS_NOSUID | linux.MS_NODEV, layers)


class VolumeGone(Exception):
    """A volume's directory was removed between its check and its mount (the create is refused)."""


def _mount_volumes(plan: StagePlan, pid: int) -> None:
    """Each volume's directory, idmapped to the jail's user namespace: the jail's root is the owner
    0 of the files on disk (and the jail's uid N their owner N), whichever host uids it runs as."""
    userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for index, (fd, readonly) in enumerate(plan.volumes):
            try:
                linux.attach_tree(fd, os.path.join(plan.stage_dir, "vol", str(index)), userns, readonly=readonly)
            except FileNotFoundError:
                raise VolumeGone(f"volume {index}: its directory was removed while the sandbox started") from None
    finally:
        os.close(userns)


def _configure_network(plan: StagePlan) -> None:
    linux.interface_up("lo")
    for name, value in plan.sysctls.items():
        with open(f"/proc/sys/{name}", "w") as f:
            f.write(value)
    result = subprocess.run(["nft", "-f", "-"], input=plan.ruleset.encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"nft failed: {result.stderr.decode(errors='replace').strip()}")


def _start(plan: StagePlan) -> subprocess.Popen[bytes]:
    # A new session: a Ctrl-C meant for the server must not reach the jails (they outlive it).
    # No supplementary groups: the host root's group 0 must not follow into the jail. Output goes
    # to a pipe, never to a host file: the jail's PID 1 keeps it, and the jail could reopen a file.
    return subprocess.Popen(
        plan.argv,
        pass_fds=plan.pass_fds,
        stdin=subprocess.DEVNULL,
        stdout=plan.output_fd,
        stderr=plan.output_fd,
        env=plan.env,
        cwd="/",
        start_new_session=True,
        user=plan.ids.start,
        group=plan.ids.start,
        extra_groups=[],
    )


def _read_child_pid(fd: int, timeout: float) -> int:
    """bwrap's --info-fd output: one (multi-line) JSON object with the child's pid."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError("bwrap did not report its pid in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"bwrap exited before reporting its pid: {data!r}")
        data += chunk
        with contextlib.suppress(ValueError):
            parsed = json.loads(data)
            if isinstance(parsed, dict) and "child-pid" in parsed:
                return int(parsed["child-pid"])


def write_id_maps(pid: int, ids: IdRange) -> None:
    """The jail's root is the first id of its range; its whole range is mapped, nothing else."""
    for kind in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{kind}", "w") as f:
            f.write(ids.map_line())


def kill_unreleased(popen: subprocess.Popen[bytes]) -> None:
    """Kill a jail that was not let go yet: stop bwrap so it cannot clone any more, kill what it
    cloned (the jail's first process, blocked until released, taking its PID namespace along),
    then bwrap itself, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(popen.pid, signal.SIGSTOP)
    for child in procfs.children(popen.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    popen.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(5)
