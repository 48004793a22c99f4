"""The bwrap command line of a local sandbox: what the jail gets and what it must not see."""

from pathlib import Path

import pytest

from opensandbox_platform.server.runtimes import jail


def args_for(tmp_path: Path, hidden: list[Path]) -> list[str]:
    dirs = jail.JailDirs(tmp_path / "sb")
    return jail.bwrap_args(
        "sb-1",
        dirs,
        root_args=jail.host_root_args(),
        hidden=hidden,
        run_size_bytes=1 << 20,
        info_fd=3,
        block_fd=4,
        ctl_fd=5,
        evt_fd=6,
    )


def pairs(args: list[str], flag: str) -> list[tuple[str, str]]:
    return [(args[i + 1], args[i + 2]) for i, a in enumerate(args) if a == flag]


def test_namespaces_hostname_and_private_dirs(tmp_path: Path) -> None:
    args = args_for(tmp_path, [])
    assert {"--unshare-pid", "--unshare-ipc", "--unshare-uts"} <= set(args)
    assert "--unshare-net" not in args  # the host's network, by design
    assert args[args.index("--hostname") + 1] == "sb-1"
    binds = dict((dest, src) for src, dest in pairs(args, "--bind"))
    assert binds == {
        "/tmp": str(tmp_path / "sb/tmp"),
        "/root": str(tmp_path / "sb/home"),
        "/workspace": str(tmp_path / "sb/workspace"),
    }
    assert ("/usr", "/usr") in pairs(args, "--ro-bind")
    assert args[args.index("--remount-ro") + 1] == "/"
    assert args[args.index("--chdir") + 1] == "/workspace"


def test_the_python_running_execd_stays_visible_under_a_private_home(tmp_path: Path) -> None:
    ro_binds = pairs(args_for(tmp_path, []), "--ro-bind")
    for path in jail.runtime_paths():
        if path.startswith(("/root/", "/tmp/")):
            assert (path, path) in ro_binds


def test_state_dir_and_config_are_hidden_unless_already_private(tmp_path: Path) -> None:
    visible_dir = Path("/usr/share")
    visible_file = Path("/etc/hostname")
    args = args_for(tmp_path, [visible_dir, visible_file, tmp_path / "under-tmp"])
    tmpfs = [args[i + 1] for i, a in enumerate(args) if a == "--tmpfs"]
    assert str(visible_dir) in tmpfs and str(tmp_path / "under-tmp") not in tmpfs
    assert ("/dev/null", str(visible_file)) in pairs(args, "--ro-bind")


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="capabilities are only dropped for a root caller")
def test_capabilities_are_a_short_list(tmp_path: Path) -> None:
    args = args_for(tmp_path, [])
    assert args[args.index("--cap-drop") + 1] == "ALL"
    added = {args[i + 1] for i, a in enumerate(args) if a == "--cap-add"}
    assert added == set(jail.CAPABILITIES)
    assert not added & {"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_MKNOD", "CAP_SYS_PTRACE", "CAP_NET_ADMIN"}


def test_jail_init_gets_its_pipes(tmp_path: Path) -> None:
    args = args_for(tmp_path, [])
    tail = args[args.index("--") + 1 :]
    assert tail[1:] == ["-m", jail.JAIL_INIT, "--ctl-fd", "5", "--evt-fd", "6"]
    assert args[args.index("--info-fd") + 1] == "3" and args[args.index("--block-fd") + 1] == "4"
