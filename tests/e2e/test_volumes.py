"""Volumes through the official SDK (host and pvc backends) on each runtime under test, and a
sandbox abusing them: paths outside the allowlist, `..`, symlinks (also swapped while a create
checks them), a read-only volume written, a subPath leading out."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.filesystem import WriteEntry
from opensandbox.models.sandboxes import PVC, Host, Volume

from harness.docker_api import docker_api
from harness.server_process import ServerProcess, running_server
from tests.e2e.test_server_sdk import config, stdout


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(os.path.realpath(tmp_path_factory.mktemp("host-volumes")))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def vserver(tmp_path_factory: pytest.TempPathFactory, runtime_name: str, allowed: Path) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp(f"volumes-{runtime_name}"),
        runtime=runtime_name,
        server_config=f'allowedHostPaths = ["{allowed}"]',
    ) as server:
        yield server


@pytest.fixture
def claim(vserver: ServerProcess) -> Iterator[Callable[[str], str]]:
    """Claim names of this test's own (the docker engine's named volumes outlive servers), removed
    afterwards."""
    made: list[str] = []

    def name(base: str) -> str:
        made.append(f"{base}-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield name
    if vserver.runtime == "docker":
        for volume in made:
            docker_api("DELETE", f"/volumes/{volume}", params={"force": "true"})


@contextlib.asynccontextmanager
async def created(server: ServerProcess, volumes: list[Volume]) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(server.image, connection_config=config(server), volumes=volumes)
    try:
        yield sb
    finally:
        with contextlib.suppress(SandboxApiException):
            await sb.kill()
        await sb.close()


async def run(sb: Sandbox, command: str) -> tuple[list[str], int | None]:
    execution = await sb.commands.run(command)
    return stdout(execution), execution.exit_code


HOST_HOSTNAME = Path("/etc/hostname").read_text().strip()


def host_dir(allowed: Path, name: str) -> Path:
    path = allowed / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


async def test_host_volume_is_shared_with_the_host_as_the_sandboxs_root(vserver: ServerProcess, allowed: Path) -> None:
    data = host_dir(allowed, "shared")
    (data / "from-host.txt").write_text("hello from the host\n")
    (data / "alice").mkdir()
    os.chown(data / "alice", 1000, 1000)
    volume = Volume(name="data", mount_path="/mnt/data", host=Host(path=str(data)))
    async with created(vserver, [volume]) as sb:
        out, code = await run(
            sb,
            "cat /mnt/data/from-host.txt && echo written > /mnt/data/from-sandbox.txt"
            " && stat -c %u /mnt/data/from-host.txt",
        )
        assert code == 0 and out == ["hello from the host", "0"], out  # the host's root owns it: the sandbox's root
        # files_with_identity: what uid 1000 makes is 1000's on the host's disk too.
        alice = sb.files_with_identity(1000, 1000)
        await alice.write_file("/mnt/data/alice/by-alice.txt", "mine", mode=600)
        await alice.create_directories([WriteEntry(path="/mnt/data/alice/dir", mode=700)])
    written = data / "from-sandbox.txt"
    assert written.read_text() == "written\n"
    assert written.stat().st_uid == 0  # the sandbox's root wrote it: on disk, root (not a jail's host uid)
    for made, mode in ((data / "alice" / "by-alice.txt", 0o600), (data / "alice" / "dir", 0o700)):
        st = made.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, mode), made


async def test_read_only_volume_cannot_be_written_or_remounted(vserver: ServerProcess, allowed: Path) -> None:
    data = host_dir(allowed, "readonly")
    (data / "keep.txt").write_text("keep\n")
    volume = Volume(name="ro", mount_path="/mnt/ro", host=Host(path=str(data)), read_only=True)
    async with created(vserver, [volume]) as sb:
        out, _ = await run(
            sb,
            "cat /mnt/ro/keep.txt; echo x > /mnt/ro/keep.txt; rm -f /mnt/ro/keep.txt; touch /mnt/ro/new;"
            " mount -o remount,rw /mnt/ro; echo x > /mnt/ro/keep.txt; echo done",
        )
        assert out[0] == "keep" and out[-1] == "done"
    assert (data / "keep.txt").read_text() == "keep\n" and not (data / "new").exists()


async def test_pvc_volume_outlives_its_sandbox_and_is_shared_by_the_next(
    vserver: ServerProcess, claim: Callable[[str], str]
) -> None:
    cache = claim("cache")
    volume = Volume(name="cache", mount_path="/cache", pvc=PVC(claim_name=cache))
    async with created(vserver, [volume]) as first:
        _, code = await run(first, "echo persisted > /cache/state && mkdir -p /cache/sub && echo in-sub > /cache/sub/f")
        assert code == 0
    # Deleted; the next sandbox mounting the same claim reads what the first wrote (a subPath too).
    sub = Volume(name="sub", mount_path="/sub", pvc=PVC(claim_name=cache, create_if_not_exists=False), sub_path="sub")
    async with created(vserver, [volume, sub]) as second:
        out, _ = await run(second, "cat /cache/state /sub/f")
        assert out == ["persisted", "in-sub"]


async def test_pvc_delete_on_termination_removes_only_what_the_create_made(
    vserver: ServerProcess, claim: Callable[[str], str]
) -> None:
    scratch = claim("scratch")
    temporary = Volume(
        name="tmp", mount_path="/scratch", pvc=PVC(claim_name=scratch, delete_on_sandbox_termination=True)
    )
    async with created(vserver, [temporary]) as sb:
        assert (await run(sb, "echo x > /scratch/f"))[1] == 0
    async with created(vserver, [Volume(name="tmp", mount_path="/scratch", pvc=PVC(claim_name=scratch))]) as sb:
        out, _ = await run(sb, "ls /scratch | wc -l")
        assert out == ["0"]  # a new, empty volume: the first was removed with its sandbox


def bad(server: ServerProcess, volumes: list[dict[str, object]]) -> httpx.Response:
    body = {"image": {"uri": server.image}, "entrypoint": ["sleep", "60"], "timeout": 60, "volumes": volumes}
    return httpx.post(f"{server.url}/v1/sandboxes", json=body, headers=server.headers(), timeout=60)


def test_bad_volumes_are_refused_and_nothing_is_left(vserver: ServerProcess, allowed: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = host_dir(allowed, "bad")
    (data / "link").symlink_to("/etc")
    (allowed / "linked-root").unlink(missing_ok=True)
    (allowed / "linked-root").symlink_to(outside)
    before = vserver.sandboxes_on_host()
    cases = [
        ({"name": "v", "mountPath": "/m", "host": {"path": str(outside)}}, "INVALID_PARAMETER", "allowed"),
        ({"name": "v", "mountPath": "/m", "host": {"path": f"{allowed}/../etc"}}, "INVALID_PARAMETER", ".."),
        ({"name": "v", "mountPath": "/m", "host": {"path": str(data / "link")}}, "INVALID_PARAMETER", "symlink"),
        (
            {"name": "v", "mountPath": "/m", "host": {"path": str(allowed / "linked-root")}},
            "INVALID_PARAMETER",
            "symlink",
        ),
        (
            {"name": "v", "mountPath": "/m", "host": {"path": str(data)}, "subPath": "link"},
            "INVALID_PARAMETER",
            "symlink",
        ),
        ({"name": "v", "mountPath": "/m", "host": {"path": str(data)}, "subPath": "../.."}, "INVALID_PARAMETER", ".."),
        (
            {"name": "v", "mountPath": "/m", "host": {"path": str(data)}, "subPath": "missing"},
            "INVALID_PARAMETER",
            "not exist",
        ),
        ({"name": "v", "mountPath": "/proc/x", "host": {"path": str(data)}}, "INVALID_PARAMETER", "reserved"),
        ({"name": "v", "mountPath": "relative", "host": {"path": str(data)}}, "INVALID_PARAMETER", "absolute"),
        (
            {
                "name": "v",
                "mountPath": "/m",
                "ossfs": {"bucket": "b", "endpoint": "e", "accessKeyId": "a", "accessKeySecret": "s"},
            },
            "API_NOT_SUPPORTED",
            "ossfs",
        ),
        ({"name": "v", "mountPath": "/m", "nfs": {"server": "x"}}, "API_NOT_SUPPORTED", "nfs"),
        ({"name": "v", "mountPath": "/m"}, "INVALID_PARAMETER", "exactly one"),
        ({"name": "v", "mountPath": "/m", "pvc": {"claimName": "Not_A_Label"}}, "INVALID_PARAMETER", "claimName"),
        (
            {"name": "v", "mountPath": "/m", "pvc": {"claimName": "never-made", "createIfNotExists": False}},
            "INVALID_PARAMETER",
            "does not exist",
        ),
    ]
    for volume, code, words in cases:
        response = bad(vserver, [volume])
        assert response.status_code == 400, (volume, response.text)
        assert response.json()["code"] == f"SANDBOX::{code}" and words in response.json()["message"], response.text
    # Nothing new (the engine is shared: another engineer's sandboxes may come and go meanwhile).
    assert not vserver.sandboxes_on_host() - before


async def test_a_symlink_swapped_while_creates_check_it_never_leads_out(vserver: ServerProcess, allowed: Path) -> None:
    """Another sandbox (here a thread of the test) swaps a shared volume's directory for a symlink to
    /etc as fast as it can while creates mount it by subPath: each create either refuses it or
    mounts the real directory, never /etc."""
    data = host_dir(allowed, "race")
    stop = threading.Event()

    def swap() -> None:
        target = data / "sub"
        while not stop.is_set():
            with contextlib.suppress(OSError):
                target.mkdir()
                (target / "marker").write_text("inside\n")
            with contextlib.suppress(OSError):
                shutil.rmtree(target)
                target.symlink_to("/etc")
            with contextlib.suppress(OSError):
                target.unlink()

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    outcomes = []
    try:
        for _ in range(8):
            volume = Volume(name="race", mount_path="/race", host=Host(path=str(data)), sub_path="sub")
            try:
                async with created(vserver, [volume]) as sb:
                    out, _ = await run(sb, "ls /race; test -e /race/passwd && echo LEAKED")
                    assert "LEAKED" not in out
                    outcomes.append("mounted")
            except SandboxApiException as exc:
                assert exc.status_code == 400
                outcomes.append("refused")
    finally:
        stop.set()
        swapper.join()
    assert outcomes


async def test_a_sandbox_cannot_leave_its_volume_through_symlinks_it_makes(
    vserver: ServerProcess, allowed: Path
) -> None:
    data = host_dir(allowed, "inside")
    volume = Volume(name="v", mount_path="/v", host=Host(path=str(data)))
    async with created(vserver, [volume]) as sb:
        out, _ = await run(
            sb,
            "ln -s /etc/hostname /v/escape && cat /v/escape && ln -s ../../../../../etc /v/up && ls /v/up/ | head -3",
        )
    # The links resolve inside the sandbox: its own /etc, never the host's.
    assert (data / "escape").is_symlink()
    assert out and out[0] != HOST_HOSTNAME


async def test_a_subpath_another_sandbox_made_a_symlink_is_refused(
    vserver: ServerProcess, claim: Callable[[str], str]
) -> None:
    """A sandbox sharing a named volume replaces the directory others mount by subPath with a
    symlink to / : the next create refuses it rather than mounting the server's (or engine's) root."""
    shared = claim("shared")
    whole = Volume(name="all", mount_path="/shared", pvc=PVC(claim_name=shared))
    async with created(vserver, [whole]) as attacker:
        _, code = await run(attacker, "ln -s / /shared/work && ln -s ../../../../../../../../etc /shared/up")
        assert code == 0
    for sub_path in ("work", "up", "work/etc"):
        victim = Volume(name="w", mount_path="/w", pvc=PVC(claim_name=shared), sub_path=sub_path)
        with pytest.raises(SandboxApiException) as refused:
            async with created(vserver, [victim]):
                pass
        assert refused.value.status_code == 400 and "symlink" in str(refused.value), sub_path
    assert not list((vserver.state_dir / "binds").glob("*/*")), "staging mounts were left behind"
