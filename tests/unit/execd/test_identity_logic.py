"""execd acting as another user (`/v1/filesystem/{uid}/{gid}/...`): the route's ids, and the
threads that become that user for good. The switch itself needs root (the suite runs as root here;
elsewhere those tests skip)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import files, identity

USER = identity.Identity(4242, 4343)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.mark.parametrize(("uid", "gid"), [("0", "0"), ("1000", "1000"), ("4294967294", "65534")])
def test_ids_in_range_are_accepted(uid: str, gid: str) -> None:
    assert identity.parse(uid, gid) == (int(uid), int(gid))


@pytest.mark.parametrize("bad", ["-1", "4294967295", "99999999999", "1e3", "abc", "", " 1", "\u0661"])
def test_other_ids_are_a_400(bad: str) -> None:
    for uid, gid in ((bad, "0"), ("0", bad)):
        with pytest.raises(ApiError) as err:
            identity.parse(uid, gid)
        assert err.value.status == 400


@pytest.fixture
def tree() -> Iterator[Path]:
    """A world-traversable directory (pytest's tmp_path is under a root-only one) with a root-only
    file, a directory of USER's and a link from there to the root-only file."""
    base = Path(tempfile.mkdtemp(prefix="identity-"))
    base.chmod(0o755)
    (base / "shadow").write_text("root-only")
    (base / "shadow").chmod(0o600)
    home = base / "home"
    home.mkdir()
    os.chown(home, USER.uid, USER.gid)
    (home / "link").symlink_to(base / "shadow")
    yield base
    shutil.rmtree(base)


@pytest.fixture
async def loop_thread_stays_root() -> AsyncIterator[None]:
    yield
    assert os.getresuid() == (0, 0, 0) and os.getresgid() == (0, 0, 0)
    assert await asyncio.to_thread(os.getresuid) == (0, 0, 0)  # the default executor's threads too


@needs_root
@pytest.mark.usefixtures("loop_thread_stays_root")
async def test_the_kernel_refuses_what_the_user_may_not_read(tree: Path) -> None:
    for path in (tree / "shadow", tree / "home" / "link", tree / "home" / ".." / "shadow"):
        with pytest.raises(ApiError) as err:
            await identity.run_as(USER, files.open_for_download, str(path))
        assert err.value.status == 403, path
    fh, _, _ = await identity.run_as(identity.Identity(0, 0), files.open_for_download, str(tree / "shadow"))
    with fh:
        assert fh.read() == b"root-only"  # uid 0 is root, as documented


@needs_root
@pytest.mark.usefixtures("loop_thread_stays_root")
async def test_what_the_user_makes_is_its_own(tree: Path) -> None:
    home = tree / "home"
    await identity.run_as(USER, files.make_dirs, {str(home / "a" / "b"): {"mode": 750}})
    for made in (home / "a", home / "a" / "b"):
        st = made.stat()
        assert (st.st_uid, st.st_gid) == USER
    with pytest.raises(ApiError) as err:  # giving a file away is root's
        await identity.run_as(USER, files.set_permissions, {str(home / "a"): {"owner": "0"}})
    assert err.value.status == 403


@needs_root
@pytest.mark.usefixtures("loop_thread_stays_root")
async def test_a_user_thread_can_never_become_root_again() -> None:
    def back_to_root() -> None:
        identity._syscall(USER, identity._SYSCALLS[os.uname().machine][2], 0, 0, 0)

    with pytest.raises(ApiError) as err:
        await identity.run_as(USER, back_to_root)
    assert err.value.status == 501
    assert await identity.run_as(USER, os.getgroups) == [USER.gid]  # no supplementary group of root's


@needs_root
async def test_a_listing_skips_subdirectories_it_may_not_read_but_refuses_an_unreadable_root(tree: Path) -> None:
    (tree / "home" / "locked").mkdir(mode=0o700)
    (tree / "home" / "locked" / "inside").write_text("x")
    names = [Path(e["path"]).name for e in await identity.run_as(USER, files.list_dir, str(tree / "home"), "3")]
    assert "locked" in names and "inside" not in names
    for call in (files.list_dir, files.search):
        with pytest.raises(ApiError) as err:
            await identity.run_as(USER, call, str(tree / "home" / "locked"), None)
        assert err.value.status == 403


@needs_root
async def test_clients_hanging_up_do_not_start_threads_without_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "_slots", asyncio.Semaphore(2))
    release, started = threading.Event(), []

    def slow() -> None:
        started.append(1)
        release.wait(10)

    hung_up = [asyncio.create_task(identity.run_as(USER, slow)) for _ in range(2)]
    await asyncio.sleep(0.2)
    for request in hung_up:  # the clients hang up; their threads go on
        request.cancel()
    waiting = [asyncio.create_task(identity.run_as(USER, slow)) for _ in range(2)]
    await asyncio.sleep(0.2)
    assert len(started) == 2  # the next requests wait for a thread to end, not for a client to leave
    release.set()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert len(started) == 4
