"""Isolated sessions: request validation, layer planning, the bwrap command line, the shell lines,
and the diff / commit of upper layers (on real directories in a temp dir)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd.isolated import changes, commit, layout, shell
from opensandbox_platform.execd.isolated.spec import (
    Overlay,
    SessionSpec,
    clean_path,
    parse_commit,
    parse_create,
    parse_run,
)

pytestmark = pytest.mark.unit


def create(body: Any, **kwargs: Any) -> SessionSpec:
    return parse_create(body, default_idle=600, **kwargs)


def bad(body: Any, fragment: str, **kwargs: Any) -> None:
    with pytest.raises(ApiError) as caught:
        create(body, **kwargs)
    assert caught.value.status == 400 and fragment in caught.value.message, caught.value.message


# -- spec -------------------------------------------------------------------------------------------


def test_workspace_is_sugar_for_a_first_overlay() -> None:
    spec = create({"workspace": {"path": "/w"}, "overlays": [{"path": "/usr/local", "persist": False}]})
    assert spec.overlays == (Overlay("/w", "overlay", None), Overlay("/usr/local", "overlay", False))
    assert spec.overlays[0].persistent and not spec.overlays[1].persistent
    assert spec.idle_timeout_seconds == 600 and spec.share_net and spec.uid_mode == "setpriv"
    wire = spec.wire()
    assert wire["workspace"] == {"path": "/w", "mode": "overlay"}
    assert wire["overlays"][1] == {"path": "/usr/local", "mode": "overlay", "persist": False}


def test_profile_sets_the_network_default() -> None:
    assert not create({"workspace": {"path": "/w"}, "profile": "strict"}).share_net
    assert create({"workspace": {"path": "/w"}, "profile": "strict", "share_net": True}).share_net


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "at least one of"),
        ({"workspace": {"path": "w"}}, "absolute"),
        ({"workspace": {"path": "/w/../etc"}}, "'..'"),
        ({"workspace": {"path": "/w/"}}, "clean"),
        ({"workspace": {"path": "/a//b"}}, "clean"),
        ({"workspace": {"path": "/proc/1"}}, "/proc"),
        ({"workspace": {"path": "/dev"}}, "/dev"),
        ({"workspace": {"path": "/w", "mode": "cow"}}, "mode"),
        ({"overlays": [{"path": "/w", "mode": "ro", "persist": False}]}, "persist"),
        ({"overlays": [{"path": "/w"}, {"path": "/w"}]}, "unique"),
        ({"overlays": [{"path": f"/w{i}"} for i in range(17)]}, "at most 16"),
        ({"workspace": {"path": "/w"}, "uid": True}, "uid"),
        ({"workspace": {"path": "/w"}, "uid": -1}, "uid"),
        ({"workspace": {"path": "/w"}, "uid_mode": "root"}, "uid_mode"),
        ({"workspace": {"path": "/w"}, "idle_timeout_seconds": -5}, "idle_timeout_seconds"),
        ({"workspace": {"path": "/w"}, "env_passthrough": {"keys": ["1X"]}}, "invalid variable"),
        ({"workspace": {"path": "/w"}, "binds": [{"dest": "/x"}]}, "source"),
        ({"workspace": {"path": "/w"}, "binds": [{"source": "/s", "dest": "/"}]}, "cannot be /"),
        ({"workspace": {"path": "/w"}, "extra_writable": ["/w"]}, "same path twice"),
        ({"workspace": {"path": "/state/x"}}, "execd's own state"),
        ("[]", "JSON object"),
    ],
)
def test_bad_create_requests_name_what_is_wrong(body: Any, fragment: str) -> None:
    bad(body, fragment, forbidden=("/state",))


def test_paths_must_exist_where_the_sandbox_is_probed() -> None:
    bad({"workspace": {"path": "/missing"}}, "not a directory", is_dir=lambda p: False)
    bad(
        {"workspace": {"path": "/w"}, "binds": [{"source": "/s", "dest": "/nowhere"}]},
        "must exist",
        is_dir=lambda p: True,
        exists=lambda p: p == "/s",
    )
    spec = create(
        {"workspace": {"path": "/w"}, "binds": [{"source": "/s", "dest": "/tmp/s", "readonly": True}]},
        is_dir=lambda p: True,
        exists=lambda p: p == "/s",
    )
    assert spec.binds[0].readonly and spec.binds[0].dest == "/tmp/s"


def test_env_passthrough() -> None:
    spec = create({"workspace": {"path": "/w"}, "env_passthrough": {"mode": "allow", "keys": ["A"]}})
    assert spec.env_passthrough.apply({"A": "1", "B": "2"}) == {"A": "1"}
    spec = create({"workspace": {"path": "/w"}, "env_passthrough": {"keys": ["A"]}})
    assert spec.env_passthrough.apply({"A": "1", "B": "2"}) == {"B": "2"}


def test_clean_path() -> None:
    assert clean_path("/", "p") == "/"
    with pytest.raises(ApiError):
        clean_path("/a\0b", "p")


def test_run_and_commit_requests() -> None:
    run = parse_run({"code": "echo", "envs": {"A": "b"}, "timeout_seconds": 5, "background": True})
    assert run.envs == (("A", "b"),) and run.timeout_seconds == 5 and run.background
    assert parse_run({"code": "x", "timeout_seconds": 0}).timeout_seconds is None
    for body in ({"code": " "}, {"code": 1}, {"code": "x", "envs": {"A-B": "x"}}, {"code": "x", "background": 1}):
        with pytest.raises(ApiError):
            parse_run(body)
    assert parse_commit(None, None).paths == () and not parse_commit(None, None).discard
    assert parse_commit({}, "true").discard
    assert parse_commit({"paths": ["/w/a"]}, None).paths == ("/w/a",)
    for body, arg in (({"paths": []}, None), ({"paths": ["rel"]}, None), ({}, "maybe"), ([], None)):
        with pytest.raises(ApiError):
            parse_commit(body, arg)


# -- layout -----------------------------------------------------------------------------------------

MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/l
23 22 0:22 / /proc rw,nosuid - proc proc rw
24 22 0:23 / /dev rw - tmpfs tmpfs rw
25 22 8:1 /etc/hosts /etc/hosts rw - ext4 /dev/vda rw
26 22 0:24 / /sys ro - sysfs sysfs ro
27 22 8:1 /data /workspace/data rw - ext4 /dev/vda rw
28 22 0:25 / /state rw - tmpfs tmpfs rw
29 22 8:1 /x /with\\040space rw - ext4 /dev/vda rw
"""

TREE = {
    "/": ["bin", "dev", "etc", "proc", "state", "sys", "tmp", "usr", "workspace", "with space"],
    "/etc": ["hosts", "passwd", "ssl"],
    "/workspace": ["data", "src", "README"],
}
KINDS = {"/bin": "symlink", "/etc/hosts": "file", "/etc/passwd": "file", "/workspace/README": "file"}


def kind_of(path: str) -> str:
    return KINDS.get(path, "dir")


def listdir(path: str) -> list[str]:
    return TREE.get(path, [])


def test_parse_mountinfo_unescapes() -> None:
    mounts = layout.parse_mountinfo(MOUNTINFO)
    assert [m.mountpoint for m in mounts][-1] == "/with space"
    assert mounts[0].fstype == "overlay" and mounts[1].fstype == "proc"


def plan(body: dict[str, Any]) -> list[layout.Layer]:
    return layout.plan_layers(create(body), layout.parse_mountinfo(MOUNTINFO), ["/state"], kind_of, listdir)


def test_a_directory_without_mounts_below_is_one_overlay() -> None:
    assert plan({"workspace": {"path": "/workspace/src"}}) == [layout.Layer(0, "/workspace/src", "overlay", 0)]


def test_a_directory_with_mounts_below_is_decomposed() -> None:
    layers = plan({"workspace": {"path": "/workspace"}})
    assert layers[0] == layout.Layer(0, "/workspace", "copy", 0, (("data", True), ("src", True)))
    assert {(layer.path, layer.kind) for layer in layers[1:]} == {
        ("/workspace/data", "overlay"),
        ("/workspace/src", "overlay"),
    }


def test_the_root_is_decomposed_around_kernel_mounts_and_state() -> None:
    layers = {layer.path: layer for layer in plan({"overlays": [{"path": "/"}]})}
    root = layers["/"]
    assert root.kind == "copy"
    held = dict(root.placeholders)
    # the session's own /proc, /dev, /sys, /tmp; execd's state; the sub-layers
    assert {"proc", "dev", "sys", "tmp", "state", "etc", "usr", "workspace", "with space"} <= set(held)
    assert "bin" not in held  # a symlink: copied into the skeleton
    assert layers["/etc"].kind == "copy" and dict(layers["/etc"].placeholders) == {"hosts": False, "ssl": True}
    assert layers["/etc/hosts"].kind == "ro-bind"  # a file mount point
    assert layers["/etc/ssl"].kind == "overlay" and layers["/usr"].kind == "overlay"
    assert layers["/workspace"].kind == "copy" and layers["/workspace/data"].kind == "overlay"
    assert "/proc" not in layers and "/state" not in layers
    numbers = [layer.n for layer in layers.values() if layer.kind == "overlay"]
    assert sorted(numbers) == list(range(len(numbers)))


def test_a_nested_entry_owns_its_subtree() -> None:
    layers = plan({"overlays": [{"path": "/workspace"}, {"path": "/workspace/data", "mode": "ro"}]})
    paths = [(layer.path, layer.kind, layer.entry) for layer in layers]
    assert ("/workspace/data", "ro-bind", 1) in paths
    assert ("/workspace/data", "overlay", 0) not in paths
    assert ("/workspace", "overlay", 0) in paths  # nothing else is mounted below it


def view(**kwargs: Any) -> layout.View:
    defaults: dict[str, Any] = dict(
        stage="/st/s1/stage", skeletons="/st/s1/k", cwd="/w", uid=0, gid=0, info_fd=9,
        private_proc=True, hide=("/st",), mask_files=("/opt/.env",), tmp_bytes=1 << 20,
    )  # fmt: skip
    defaults.update(kwargs)
    return layout.View(**defaults)


def test_bwrap_argv_orders_mounts_shallow_first() -> None:
    spec = create({"workspace": {"path": "/w"}, "extra_writable": ["/w/out"], "share_net": False})
    layers = [layout.Layer(0, "/w", "overlay", 0)]
    argv = layout.bwrap_argv("bwrap", spec, layers, view(), ["bash"])
    text = " ".join(argv)
    assert "--unshare-user --uid 0 --gid 0 --disable-userns" in text and "--unshare-net" in text
    assert "--ro-bind / /" in text and "--proc /proc" in text and "--cap-drop ALL" in text
    assert text.index("--bind /st/s1/stage/m/0 /w") < text.index("--bind /w/out /w/out")
    assert "--tmpfs /st" in text and "--ro-bind /dev/null /opt/.env" in text
    assert "--size 1048576 --perms 1777 --tmpfs /tmp" in text
    assert argv[-2:] == ["--", "bash"] and "--bind /st/s1/stage/ctl /dev/.osb" in text


def test_bwrap_argv_without_a_private_proc_or_with_a_root_copy() -> None:
    spec = create({"overlays": [{"path": "/"}]})
    layers = [layout.Layer(0, "/", "copy", 0, (("tmp", True),)), layout.Layer(0, "/usr", "overlay", 0)]
    text = " ".join(layout.bwrap_argv("bwrap", spec, layers, view(private_proc=False), ["bash"]))
    assert "--disable-userns" not in text and "--ro-bind /proc /proc" in text
    assert "--bind /st/s1/k/0 /" in text and "--bind /st/s1/stage/m/0 /usr" in text
    assert "--ro-bind / /" not in text


# -- shell ------------------------------------------------------------------------------------------


def test_shell_lines() -> None:
    init = shell.init_script(7, "/bin/bash", close=(9,))
    assert init.startswith("exec 9>&-\n") and "printf 'ready\\n' >&7" in init and "'exit %s\\n'" in init
    line = shell.foreground_line("/dev/.osb/r.sh", "TOK", 7, [("A", "x y")], "/w d")
    assert line.startswith("export A='x y'; cd -- '/w d' 2>/dev/null; . /dev/.osb/r.sh 7>&- </dev/null;")
    assert line.endswith("printf '%s\\n' TOK >&2\n")
    bg = shell.background_line("R1", "/dev/.osb/b.sh", "/dev/.osb/b.out", "TOK", 7, [])
    assert bg.startswith("{ ( . /dev/.osb/b.sh ) 7>&- </dev/null >/dev/.osb/b.out 2>&1; printf 'bg %s %s\\n' R1")


# -- diff and commit on real directories ------------------------------------------------------------


def whiteout(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a whiteout (character device 0/0) needs root to create")
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    real, upper = tmp_path / "real", tmp_path / "upper"
    (real / "keep").mkdir(parents=True)
    (real / "keep" / "same.txt").write_text("same\n")
    (real / "gone.txt").write_text("bye\n")
    (real / "dir").mkdir()
    (real / "dir" / "inner").write_text("x\n")
    (real / "edit.txt").write_text("v1\n")
    upper.mkdir()
    return real, upper


def walk(real: Path, upper: Path, **kwargs: Any) -> list[changes.Change]:
    upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    real_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return list(changes.Walker("/w", upper_fd, real_fd, **kwargs).changes())
    finally:
        os.close(upper_fd)
        os.close(real_fd)


def test_diff_reads_an_upper_layer(trees: tuple[Path, Path]) -> None:
    real, upper = trees
    (upper / "new.txt").write_text("new\n")
    (upper / "edit.txt").write_text("v2 longer\n")
    whiteout(upper / "gone.txt")
    (upper / "keep").mkdir()
    (upper / "keep" / "same.txt").write_text("same\n")  # copied up, unchanged
    os.utime(upper / "keep" / "same.txt", ns=(0, (real / "keep" / "same.txt").stat().st_mtime_ns))
    (upper / "dir").mkdir()
    os.setxattr(upper / "dir", "user.overlay.opaque", b"y")  # rm -rf dir; mkdir dir
    (upper / "dir" / "fresh").write_text("f\n")
    (upper / "link").symlink_to("/etc/passwd")
    found = {c.path: c for c in walk(real, upper)}
    assert {p: c.kind for p, c in found.items()} == {
        "/w/new.txt": "added",
        "/w/edit.txt": "modified",
        "/w/gone.txt": "deleted",
        "/w/dir/inner": "deleted",
        "/w/dir/fresh": "added",
        "/w/link": "added",
    }
    assert found["/w/edit.txt"].size == 10 and found["/w/edit.txt"].previous_size == 3
    assert found["/w/link"].type == "symlink" and found["/w/gone.txt"].size is None


def test_diff_of_a_skeleton_only_deletes_what_it_held(trees: tuple[Path, Path]) -> None:
    real, upper = trees
    (upper / "edit.txt").write_text("v1\n")
    os.utime(upper / "edit.txt", ns=(0, (real / "edit.txt").stat().st_mtime_ns))
    (upper / "dir").mkdir()  # a placeholder (another layer's mount point)
    (real / "later.txt").write_text("appeared after the skeleton was made\n")
    found = {
        c.path: c.kind for c in walk(real, upper, skip=frozenset({"dir"}), manifest=frozenset({"edit.txt", "gone.txt"}))
    }
    assert found == {"/w/gone.txt": "deleted"}


def test_diff_is_bounded(trees: tuple[Path, Path]) -> None:
    _, upper = trees
    for i in range(20):
        (upper / f"f{i}").write_text("x")
    upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walker = changes.Walker("/w", upper_fd, None, limit=5)
        assert len(list(walker.changes())) == 5 and walker.truncated
    finally:
        os.close(upper_fd)


def test_commit_applies_each_change_and_never_follows_symlinks(trees: tuple[Path, Path], tmp_path: Path) -> None:
    real, upper = trees
    outside = tmp_path / "outside"
    outside.mkdir()
    (real / "trap").symlink_to(outside)  # a real symlink where the session made a directory
    (upper / "trap").mkdir()
    os.setxattr(upper / "trap", "user.overlay.opaque", b"y")
    (upper / "trap" / "planted").write_text("x\n")
    (upper / "edit.txt").write_text("v2\n")
    os.chmod(upper / "edit.txt", 0o4755)  # set-uid is not carried over
    (upper / "deep" / "er").mkdir(parents=True)
    (upper / "deep" / "er" / "f").write_text("deep\n")
    (upper / "ln").symlink_to("edit.txt")
    whiteout(upper / "dir")
    found = walk(real, upper)
    upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    real_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    try:
        outcome = commit.apply(found, upper_fd, real_fd)
    finally:
        os.close(upper_fd)
        os.close(real_fd)
    assert not outcome.failed, outcome.failed
    assert (real / "edit.txt").read_text() == "v2\n" and stat.S_IMODE((real / "edit.txt").stat().st_mode) == 0o755
    assert (real / "deep" / "er" / "f").read_text() == "deep\n"
    assert os.readlink(real / "ln") == "edit.txt"
    assert not (real / "dir").exists()
    assert (real / "trap").is_dir() and not (real / "trap").is_symlink()
    assert (real / "trap" / "planted").exists() and list(outside.iterdir()) == []
    assert not [p for p in real.rglob("*") if p.name.startswith(commit.TEMP_PREFIX)]
    assert walk(real, upper) == []  # committed: nothing left to show


def test_without_overlayfs_every_overlay_is_a_copy() -> None:
    spec = create({"workspace": {"path": "/workspace"}})
    layers = layout.plan_layers(spec, layout.parse_mountinfo(MOUNTINFO), ["/state"], kind_of, listdir, copy=True)
    assert [(layer.path, layer.kind, layer.deep) for layer in layers] == [
        ("/workspace", "copy", False),  # the top holds a mount point: a skeleton, as with overlayfs
        ("/workspace/data", "copy", True),
        ("/workspace/src", "copy", True),
    ]
    assert len({layer.n for layer in layers}) == 3


def test_a_deep_copy_and_its_diff(tmp_path: Path) -> None:
    from opensandbox_platform.execd.isolated.session import build_copy

    real = tmp_path / "real"
    (real / "a" / "b").mkdir(parents=True)
    (real / "a" / "b" / "f").write_text("f\n")
    (real / "top").write_text("t\n")
    (real / "link").symlink_to("top")
    os.chmod(real / "a", 0o555)
    copy = tmp_path / "copy"
    budget = [1 << 20]
    manifest = build_copy(str(real), str(copy), budget)
    assert manifest == {"a", "a/b", "a/b/f", "top", "link"} and budget[0] == (1 << 20) - 4
    assert stat.S_IMODE((copy / "a").stat().st_mode) == 0o555 and os.readlink(copy / "link") == "top"
    assert walk(real, copy, manifest=manifest, deep=True) == []  # a fresh copy is no change
    os.chmod(copy / "a", 0o755)
    (copy / "a" / "b" / "f").unlink()
    (copy / "new").write_text("n\n")
    (real / "a" / "b" / "later").write_text("appeared after the copy\n")
    os.chmod(real / "a", 0o755)
    found = {c.path: c.kind for c in walk(real, copy, manifest=manifest, deep=True)}
    assert found == {"/w/a/b/f": "deleted", "/w/new": "added"}
    with pytest.raises(ApiError) as caught:
        build_copy(str(real), str(tmp_path / "too-big"), [2])
    assert caught.value.status == 503


# -- the files API's resolution (a temp directory as the session's root) ------------------------


@pytest.fixture
def session_root(tmp_path: Path) -> tuple[Path, Path, Any]:
    from opensandbox_platform.execd.isolated.sessionfs import SessionFS

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "w").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("host\n")
    (root / "w" / "abs").symlink_to(str(outside))  # planted by the session's code
    (root / "w" / "up").symlink_to("../../..")
    (root / "w" / "self").symlink_to("/proc/self/root")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield root, outside, SessionFS(fd)
    os.close(fd)


def test_paths_resolve_inside_the_session(session_root: tuple[Path, Path, Any]) -> None:
    root, outside, fs = session_root
    # An absolute symlink resolves from the session's root: here it leads nowhere.
    with pytest.raises(ApiError) as caught:
        fs.open_read("/w/abs/secret")
    assert caught.value.status == 404
    # `..` stops at the root; the magic /proc links are refused.
    with pytest.raises(ApiError):
        fs.open_read("/w/up/secret")
    with pytest.raises(ApiError):
        fs.info(["/w/self/etc/passwd"])
    # A write through a planted symlink never reaches its target outside the session...
    with pytest.raises(ApiError):
        fs.open_target({"path": "/w/abs/planted", "_mode": 0o644, "_uid": -1, "_gid": -1})
    assert list(outside.iterdir()) == [outside / "secret"]
    # ... while one pointing inside the session (absolute, as the session sees it) is followed.
    (root / "w" / "real").mkdir()
    (root / "w" / "inside").symlink_to("/w/real")
    target = fs.open_target({"path": "/w/inside/f", "_mode": 0o644, "_uid": -1, "_gid": -1})
    target.write(b"x")
    target.finish()
    assert (root / "w" / "real" / "f").read_bytes() == b"x"
    fs.makedirs("/w/a/b")
    fs.make_dirs({"/w/a/b/c": {"mode": 700}})
    assert stat.S_IMODE((root / "w" / "a" / "b" / "c").stat().st_mode) == 0o700
    fs.move([{"src": "/w/a/b/c", "dest": "/w/c"}])
    listed = sorted(e["path"] for e in fs.list_dir("/w", "1"))
    assert listed == ["/w/a", "/w/abs", "/w/c", "/w/inside", "/w/real", "/w/self", "/w/up"]
    fs.delete_dirs(["/w/a"])
    with pytest.raises(ApiError):
        fs.delete_dirs(["/"])


def test_a_named_pipe_is_never_opened_blocking(session_root: tuple[Path, Path, Any]) -> None:
    root, _, fs = session_root
    os.mkfifo(root / "w" / "pipe")
    with pytest.raises(ApiError) as caught:
        fs.open_read("/w/pipe")
    assert caught.value.status == 400
    with pytest.raises(ApiError):
        fs.replace({"/w/pipe": {"old": "a", "new": "b"}})
