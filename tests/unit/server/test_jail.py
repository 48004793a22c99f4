"""The bwrap command line of a local sandbox: what the jail gets and what it must not see."""

from opensandbox_platform.api.labels import EXECD_MOUNT
from opensandbox_platform.server.runtimes import jail
from opensandbox_platform.server.runtimes.rootfs import HostPart

LAYOUT = jail.RuntimeLayout(
    binds={"python": "/root/.pyenv/versions/3.11.7", "src": "/work/x/src", "site": "/work/x/.venv/site"},
    python=f"{EXECD_MOUNT}/python/bin/python3.11",
    path=(f"{EXECD_MOUNT}/src", f"{EXECD_MOUNT}/site"),
)
PARTS = [HostPart("/usr"), HostPart("/bin", link="usr/bin"), HostPart("/etc/ssl/certs")]


def args() -> list[str]:
    return jail.bwrap_args(
        "sb-1",
        root=jail.root_args("/run/stage", PARTS, LAYOUT),
        layout=LAYOUT,
        run_size_bytes=1 << 20,
        fds=jail.Fds(info=3, userns_block=4, seccomp=5, ctl=6, evt=7, keep=8),
        proc_masks=jail.masks(lambda path: path in ("/proc/keys", "/proc/acpi")),
    )


def pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def test_every_namespace_but_the_network_which_the_server_made() -> None:
    argv = args()
    assert {"--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"} <= set(argv)
    assert "--unshare-net" not in argv  # runtimes/staging.py made it, owned by the host's user namespace
    assert argv[argv.index("--hostname") + 1] == "sb-1"
    assert argv[argv.index("--userns-block-fd") + 1] == "4" and argv[argv.index("--info-fd") + 1] == "3"
    assert (argv[argv.index("--uid") + 1], argv[argv.index("--gid") + 1]) == ("0", "0")


def test_the_root_is_the_private_tmpfs_with_only_chosen_host_parts() -> None:
    argv = args()
    assert ("/run/stage/rw", "/") in pairs(argv, "--bind")
    ro = pairs(argv, "--ro-bind")
    assert ("/usr", "/usr") in ro and ("/etc/ssl/certs", "/etc/ssl/certs") in ro
    assert ("usr/bin", "/bin") in pairs(argv, "--symlink")
    sources = {src for src, _ in ro}
    assert not sources & {"/", "/etc", "/root", "/home", "/var", "/work", "/opt", "/srv", "/mnt", "/tmp"}
    assert ("/run/stage/rt/python", f"{EXECD_MOUNT}/python") in ro
    assert ("/run/stage/rt/src", f"{EXECD_MOUNT}/src") in ro


def test_proc_sys_and_dev_are_minimal_and_masked() -> None:
    argv = args()
    assert argv[argv.index("--proc") + 1] == "/proc" and argv[argv.index("--dev") + 1] == "/dev"
    assert ("/sys", "/sys") in pairs(argv, "--ro-bind")
    assert ("/dev/null", "/proc/keys") in pairs(argv, "--ro-bind")
    remounted = [argv[i + 1] for i, a in enumerate(argv) if a == "--remount-ro"]
    assert {"/dev", "/proc/acpi"} <= set(remounted)
    assert argv[argv.index("--chdir") + 1] == "/workspace"


def test_capabilities_are_a_short_list_and_seccomp_is_on() -> None:
    argv = args()
    added = {argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"}
    assert added == set(jail.CAPABILITIES)
    assert not added & {"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_MKNOD", "CAP_SYS_PTRACE", "CAP_NET_ADMIN"}
    assert argv[argv.index("--seccomp") + 1] == "5"


def test_jail_init_runs_isolated_with_its_pipes() -> None:
    argv = args()
    tail = argv[argv.index("--") + 1 :]
    assert tail[:4] == [LAYOUT.python, "-I", "-S", "-c"]
    assert "sys.path[:0] = ['/opt/opensandbox/src', '/opt/opensandbox/site']" in tail[4]
    assert tail[5:] == ["--ctl-fd", "6", "--evt-fd", "7", "--keep-fd", "8"]


def test_runtime_layout_of_this_interpreter() -> None:
    layout = jail.runtime_layout()
    assert layout.python.startswith(f"{EXECD_MOUNT}/python/")
    assert "python" in layout.binds and all(p.startswith(EXECD_MOUNT) for p in layout.path)


def test_mountpoints_are_made_for_binds_not_links() -> None:
    points = jail.mountpoints(PARTS, LAYOUT)
    assert ("/usr", True) in points and all(path != "/bin" for path, _ in points)
    assert (f"{EXECD_MOUNT}/site", True) in points


def test_an_images_root_is_its_overlay_with_execds_runtime_on_top() -> None:
    root = jail.image_root_args("/run/stage", LAYOUT)
    assert root[:3] == ["--bind", "/run/stage/root", "/"]
    assert ("/run/stage/rt/python", f"{EXECD_MOUNT}/python") in pairs(root, "--ro-bind")
    assert "/usr" not in root


def test_the_interpreters_libraries_are_found_but_not_passed_on() -> None:
    layout = jail.RuntimeLayout(binds=LAYOUT.binds, python=LAYOUT.python, path=LAYOUT.path, library_path="/opt/x/lib")
    argv = jail.bwrap_args(
        "sb-1",
        root=[],
        layout=layout,
        run_size_bytes=1,
        fds=jail.Fds(info=3, userns_block=4, seccomp=5, ctl=6, evt=7, keep=8),
        proc_masks=[],
    )
    i = argv.index("--setenv")
    assert argv[i + 1 : i + 3] == ["LD_LIBRARY_PATH", "/opt/x/lib"]  # jail_init drops it before starting anything
