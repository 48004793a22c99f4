"""How a session's namespace is laid out: which copy-on-write layers an overlay path needs, and the
bubblewrap command line that assembles the view. Pure: the mount table and the file-type probe come
in as data, so every rule is unit-tested.

An overlay of path P is one overlayfs per filesystem under P: overlayfs sees one filesystem (its
lower directory's), not what is mounted below it, so each directory mount point under P (the host
directories of a local jail's root, a volume under /workspace) gets an overlay of its own, bound on
top in the session. Kernel filesystems (proc, sysfs, ...) and file mount points (/etc/hosts in a
container) are bound read-only instead; /proc, /dev and /sys themselves are the session's own.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opensandbox_platform.execd.isolated.spec import RESERVED, SessionSpec, under

# Filesystems that are not data: bound read-only into a root overlay, never overlaid.
SPECIAL_FS = frozenset(
    {
        "proc", "sysfs", "devtmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "bpf", "debugfs", "tracefs",
        "securityfs", "pstore", "fusectl", "configfs", "hugetlbfs", "autofs", "binfmt_misc", "efivarfs",
        "nsfs", "rpc_pipefs", "selinuxfs", "ramfs",
    }
)  # fmt: skip
CONTROL_DIR = "/dev/.osb"  # where a session sees its control directory (run scripts, log pipes)
# What root keeps in a `balanced` session (Docker's default set minus NET_RAW and MKNOD): they hold
# only inside the session's own user namespace, over files whose owner it maps (execd's uid), so
# they let the session's root write a root-owned 0555 directory of its overlays as a container's
# root could, and nothing outside. A `strict` session, and any uid but 0, keeps none.
ROOT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
    "CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE",
)  # fmt: skip


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str = ""


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of /proc/self/mountinfo, in order (a later mount on the same point hides an earlier one)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        mounts.append(Mount(unescape(fields[4]), rest[0], unescape(rest[1]) if len(rest) > 1 else ""))
    return mounts


@dataclass(frozen=True)
class Layer:
    """One mount of the session's view that belongs to an overlay entry.

    kind:
    - `overlay`: an overlayfs of `path` with upper layer number `n`;
    - `copy`: a directory that holds mount points of its own (a root of a container, of a jail):
      an overlayfs of it is refused by the kernel (its child mounts are locked in the session's
      user namespace), so its direct entries are copied into skeleton number `n` and each
      subdirectory gets a layer of its own; `placeholders` are the names kept empty in the skeleton
      (mount points of other layers, of the session's /proc, /dev, /sys, /tmp);
    - `ro-bind`: a kernel filesystem or a file mount point, shown as it is;
    - `bind` / `ro-bind` for an entry's own rw / ro modes.
    """

    entry: int  # index in SessionSpec.overlays
    path: str  # where it appears in the session (= its lower in execd's view)
    kind: str
    n: int = -1
    placeholders: tuple[tuple[str, bool], ...] = ()  # copy layers: (name, is a directory)
    deep: bool = False  # a copy of the whole tree (where overlayfs is not available)


def depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"


def plan_layers(
    spec: SessionSpec,
    mounts: Sequence[Mount],
    hidden: Sequence[str],
    kind_of: Callable[[str], str],
    listdir: Callable[[str], list[str]],
    *,
    copy: bool = False,
) -> list[Layer]:
    """The layers of every overlay entry, shallow first (bwrap mounts in argument order, so a deeper
    mount lands on top of a shallower one). `kind_of(path)` is `dir`, `file`, `symlink`, `other` or
    `missing` (not following symlinks); `listdir` lists a directory of execd's view. With `copy`
    (no overlayfs here), what would be an overlay is a copy of the whole tree instead."""
    visible: dict[str, Mount] = {}
    for m in mounts:  # a later mount on the same point is the one that is seen
        visible[m.mountpoint] = m
    others = [o.path for o in spec.overlays] + list(spec.extra_writable) + [b.dest for b in spec.binds]
    private_tmp = not any(p != "/" and under("/tmp", p) for p in others)
    counter = {"overlay": 0, "copy": 0}
    layers: list[Layer] = []

    def number(kind: str) -> int:
        counter[kind] += 1
        return counter[kind] - 1

    def cow(index: int, path: str) -> Layer:
        if copy:
            return Layer(index, path, "copy", number("copy"), deep=True)
        return Layer(index, path, "overlay", number("overlay"))

    def elsewhere(path: str, entry_path: str) -> bool:
        """The session gets `path` from something other than this entry's layers."""
        if any(path == top for top in RESERVED) or (private_tmp and path == "/tmp"):
            return True
        if any(under(path, h) for h in hidden):
            return True
        return any(o != entry_path and under(o, entry_path) and path == o for o in others)

    def decompose(index: int, entry_path: str, directory: str, cuts: list[str]) -> None:
        placeholders: list[tuple[str, bool]] = []
        n = number("copy")
        at = len(layers)
        for name in sorted(listdir(directory)):
            child = _join(directory, name)
            kind = kind_of(child)
            if elsewhere(child, entry_path):
                placeholders.append((name, kind != "file"))
                continue
            inner = [c for c in cuts if under(c, child)]
            if inner:
                placeholders.append((name, kind == "dir"))
                mount = visible.get(child)
                if mount is not None and (mount.fstype in SPECIAL_FS or kind != "dir"):
                    layers.append(Layer(index, child, "ro-bind"))
                    continue
                below = [c for c in inner if c != child]
                if below:
                    decompose(index, entry_path, child, below)
                else:
                    layers.append(cow(index, child))
            elif kind == "dir":
                placeholders.append((name, True))
                layers.append(cow(index, child))
            # files, symlinks and the rest are copied into the skeleton
        layers.insert(at, Layer(index, directory, "copy", n, tuple(placeholders)))

    for index, entry in enumerate(spec.overlays):
        if entry.mode != "overlay":
            layers.append(Layer(index, entry.path, "bind" if entry.mode == "rw" else "ro-bind"))
            continue
        cuts = [
            point
            for point in visible
            if point != entry.path
            and under(point, entry.path)
            and not any(under(point, top) for top in RESERVED)
            and not any(under(point, h) for h in hidden)
            and not any(o != entry.path and under(o, entry.path) and under(point, o) for o in others)
        ]
        if cuts:
            decompose(index, entry.path, entry.path, cuts)
        else:
            layers.append(cow(index, entry.path))
    return sorted(layers, key=lambda layer: depth(layer.path))


@dataclass(frozen=True)
class View:
    """Everything the bwrap command line needs besides the spec."""

    stage: str  # the stage directory (execd's view): m/<n> merged mounts, ctl/
    skeletons: str  # where copy layers' skeletons are (execd's view)
    cwd: str
    uid: int  # the session's uid/gid inside its user namespace
    gid: int
    info_fd: int
    private_proc: bool  # a new /proc can be mounted (else the sandbox's is bound read-only)
    hide: tuple[str, ...]  # directories replaced by an empty tmpfs (execd's state)
    mask_files: tuple[str, ...]  # files replaced by /dev/null (execd's env file)
    tmp_bytes: int
    caps: tuple[str, ...] = ()  # capabilities kept inside the session's user namespace


def bwrap_argv(bwrap: str, spec: SessionSpec, layers: Sequence[Layer], view: View, command: Sequence[str]) -> list[str]:
    argv = [bwrap, "--unshare-user", "--uid", str(view.uid), "--gid", str(view.gid)]
    if view.private_proc:
        # bwrap does it by writing /proc/sys/user/max_user_namespaces, so it needs its own /proc.
        argv.append("--disable-userns")
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not spec.share_net:
        argv.append("--unshare-net")
    argv += ["--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL"]
    for cap in view.caps:
        argv += ["--cap-add", cap]
    argv += ["--info-fd", str(view.info_fd)]
    root = next((layer for layer in layers if layer.path == "/"), None)
    if root is not None and root.kind == "overlay":
        argv += ["--bind", f"{view.stage}/m/{root.n}", "/"]
    elif root is not None and root.kind == "copy":
        argv += ["--bind", f"{view.skeletons}/{root.n}", "/"]
    elif root is not None and root.kind == "bind":
        argv += ["--bind", "/", "/"]
    else:
        argv += ["--ro-bind", "/", "/"]
    argv += ["--ro-bind", "/sys", "/sys", "--dev", "/dev"]
    argv += ["--proc", "/proc"] if view.private_proc else ["--ro-bind", "/proc", "/proc"]
    mounts: list[tuple[str, list[str]]] = []
    for layer in layers:
        if layer.path == "/":
            continue
        if layer.kind == "overlay":
            mounts.append((layer.path, ["--bind", f"{view.stage}/m/{layer.n}", layer.path]))
        elif layer.kind == "copy":
            mounts.append((layer.path, ["--bind", f"{view.skeletons}/{layer.n}", layer.path]))
        elif layer.kind == "bind":
            mounts.append((layer.path, ["--bind", layer.path, layer.path]))
        else:
            mounts.append((layer.path, ["--ro-bind", layer.path, layer.path]))
    for path in spec.extra_writable:
        mounts.append((path, ["--bind", path, path]))
    for bind in spec.binds:
        mounts.append((bind.dest, ["--ro-bind" if bind.readonly else "--bind", bind.source, bind.dest]))
    named = [path for path, _ in mounts]
    if not any(under("/tmp", p) for p in named):
        mounts.append(("/tmp", ["--size", str(view.tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp"]))
    for path in view.hide:
        # Hidden unless already inside the private /tmp (which shows nothing of the sandbox's).
        if not (under(path, "/tmp") and "/tmp" not in named):
            mounts.append((path, ["--tmpfs", path]))
    for path in view.mask_files:
        mounts.append((path, ["--ro-bind", "/dev/null", path]))
    for _, args in sorted(mounts, key=lambda item: depth(item[0])):
        argv += args
    argv += ["--bind", f"{view.stage}/ctl", CONTROL_DIR, "--chdir", view.cwd, "--", *command]
    return argv


def session_cwd(spec: SessionSpec) -> str:
    """A session starts in its first overlay's directory."""
    return posixpath.normpath(spec.overlays[0].path)
