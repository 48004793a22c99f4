"""The root file system of a local sandbox without an image: pure functions, unit-tested.

The jail's `/` is a private, size-limited tmpfs owned by the sandbox's root. Into it go the host's
`/usr` (and the `/bin`, `/lib*`, `/sbin` links or directories) read-only, a synthesized `/etc`
(accounts, name resolution) plus the few host files in `/etc` that are public distribution data
(CA certificates, the dynamic linker's cache, time zone, ...), and empty private home, `/tmp`,
`/var` and workspace. Nothing else of the host: not its `/etc` (shadow, ssh keys, ...), `/root`,
`/home`, `/var`, `/srv`, `/mnt`, `/opt`, nor the server's own directories.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Host /etc entries that are distribution data, not the host's secrets or identity.
HOST_ETC = (
    "alternatives",
    "bash.bashrc",
    "ca-certificates.conf",
    "debian_version",
    "fonts",  # fontconfig (matplotlib and other plotting code)
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "matplotlibrc",  # Debian's python3-matplotlib keeps its rc file here (the code interpreter's plots)
    "mime.types",
    "os-release",
    "pki/ca-trust/extracted",
    "pki/tls/certs",
    "profile",
    "protocols",
    "python3",
    "python3.11",
    "services",
    "shells",
    "ssl/certs",
    "ssl/openssl.cnf",
    "terminfo",
    "timezone",
)
# Top-level host entries that make up a /usr-based root (links on merged-/usr systems).
HOST_USR = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
sys:x:3:3:sys:/dev:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
users:x:100:
nogroup:x:65534:
"""
NSSWITCH = """\
passwd: files
group: files
shadow: files
hosts: files dns
networks: files
protocols: files
services: files
"""


@dataclass(frozen=True)
class Entry:
    """A directory (`content` None) or file of the skeleton, relative to the root."""

    path: str
    mode: int
    content: str | None = None


def skeleton(hostname: str, nameserver: str | None) -> list[Entry]:
    """What the sandbox's empty root starts with, parents before children."""
    resolv = f"nameserver {nameserver}\noptions edns0\n" if nameserver else ""
    hosts = f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    return [
        Entry("etc", 0o755),
        Entry("etc/passwd", 0o644, PASSWD),
        Entry("etc/group", 0o644, GROUP),
        Entry("etc/hostname", 0o644, hostname + "\n"),
        Entry("etc/hosts", 0o644, hosts),
        Entry("etc/resolv.conf", 0o644, resolv),
        Entry("etc/nsswitch.conf", 0o644, NSSWITCH),
        Entry("root", 0o700),
        Entry("home", 0o755),
        Entry("tmp", 0o1777),
        Entry("workspace", 0o755),
        Entry("var", 0o755),
        Entry("var/tmp", 0o1777),
        Entry("var/lib", 0o755),
        Entry("var/cache", 0o755),
        Entry("var/log", 0o755),
        Entry("opt", 0o755),
        Entry("opt/opensandbox", 0o755),
        Entry("mnt", 0o755),
        Entry("srv", 0o755),
    ]


def image_skeleton(hostname: str, nameserver: str | None) -> list[Entry]:
    """What goes into the private upper layer over an image's root before it is mounted: name
    resolution of this sandbox (over the image's own files) and its workspace."""
    ours = {"etc", "etc/hostname", "etc/hosts", "etc/resolv.conf", "tmp", "workspace", "opt", "opt/opensandbox"}
    return [entry for entry in skeleton(hostname, nameserver) if entry.path in ours]


@dataclass(frozen=True)
class HostPart:
    """A host path the root shows: a symlink (`link` = its target) or a read-only bind."""

    path: str  # absolute, the same inside and outside
    link: str | None = None


def host_parts(root: str = "/") -> list[HostPart]:
    """The host's /usr and its top-level companions, then the shared /etc entries that exist."""
    parts: list[HostPart] = []
    for name in HOST_USR:
        path = os.path.join(root, name)
        if os.path.islink(path):
            parts.append(HostPart("/" + name, link=os.readlink(path)))
        elif os.path.isdir(path):
            parts.append(HostPart("/" + name))
    for name in HOST_ETC:
        path = os.path.join(root, "etc", name)
        if os.path.lexists(path):
            parts.append(HostPart("/etc/" + name, link=os.readlink(path) if os.path.islink(path) else None))
    return parts
