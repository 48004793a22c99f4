"""The synthesized root of a local sandbox without an image."""

from pathlib import Path

from opensandbox_platform.server.runtimes import rootfs


def test_the_skeleton_has_accounts_name_resolution_and_private_dirs() -> None:
    entries = {e.path: e for e in rootfs.skeleton("sb-1", "10.0.2.3")}
    assert entries["etc/passwd"].content is not None and "root:x:0:0:" in entries["etc/passwd"].content
    assert "nobody:x:65534:65534:" in (entries["etc/passwd"].content or "")
    assert "nogroup:x:65534:" in (entries["etc/group"].content or "")
    assert entries["etc/hostname"].content == "sb-1\n"
    assert "sb-1" in (entries["etc/hosts"].content or "")
    assert entries["etc/resolv.conf"].content == "nameserver 10.0.2.3\noptions edns0\n"
    assert "hosts: files dns" in (entries["etc/nsswitch.conf"].content or "")
    assert entries["tmp"].mode == 0o1777 and entries["root"].mode == 0o700
    assert {"workspace", "home", "var/tmp"} <= set(entries)
    assert "etc/shadow" not in entries


def test_without_a_network_there_is_no_nameserver() -> None:
    entries = {e.path: e for e in rootfs.skeleton("sb-1", None)}
    assert entries["etc/resolv.conf"].content == ""


def test_parents_come_before_children() -> None:
    seen: set[str] = set()
    for entry in rootfs.skeleton("x", None):
        parent = entry.path.rpartition("/")[0]
        assert not parent or parent in seen
        seen.add(entry.path)


def test_host_parts_are_usr_and_public_etc_only(tmp_path: Path) -> None:
    (tmp_path / "usr").mkdir()
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "etc/ssl/certs").mkdir(parents=True)
    (tmp_path / "etc/ssl/private").mkdir()
    (tmp_path / "etc/shadow").write_text("secret")
    (tmp_path / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (tmp_path / "root").mkdir()
    parts = rootfs.host_parts(str(tmp_path))
    assert [(p.path, p.link) for p in parts] == [
        ("/usr", None),
        ("/bin", "usr/bin"),
        ("/etc/localtime", "/usr/share/zoneinfo/UTC"),
        ("/etc/ssl/certs", None),
    ]


def test_an_images_upper_layer_brings_only_name_resolution_and_the_workspace() -> None:
    entries = {e.path for e in rootfs.image_skeleton("sb-1", "10.0.2.3")}
    assert entries == {
        "etc",
        "etc/hostname",
        "etc/hosts",
        "etc/resolv.conf",
        "tmp",
        "workspace",
        "opt",
        "opt/opensandbox",
    }
