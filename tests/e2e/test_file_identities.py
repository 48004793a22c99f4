"""The SDK's `files_with_identity(uid, gid)` (execd's `/v1/filesystem/{uid}/{gid}/...`) on each
runtime under test, direct and through the server's proxy: every files call acts as that user
(what it makes is its own, the kernel refuses what it may not), and a user abusing it (root-only
files, another user's 0600 file, `..`, symlinks out of its directory, chown to root) gets a 403
`{code, message}` and changes nothing. Ownership seen from the host: tests/e2e/test_volumes.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.filesystem import (
    ContentReplaceEntry,
    DirectoryListEntry,
    MoveEntry,
    SearchEntry,
    SetPermissionEntry,
    WriteEntry,
)

from harness.server_process import ServerProcess
from tests.e2e.test_server_sdk import MODES, config, stdout

D = "/tmp/identities"
# As root: a world-traversable directory with a root-only file and directory, uid 1000's home in
# it with links out to both, and uid 1001's private file.
SETUP = f"""set -e
rm -rf {D}; mkdir -m 755 {D}; cd {D}
echo s3cret > shadow; chmod 600 shadow
mkdir -m 700 secret; echo inner > secret/f
mkdir home; chown 1000:1000 home
ln -s {D}/shadow home/to-shadow; ln -s {D}/secret home/to-secret
echo theirs > other; chown 1001:1001 other; chmod 600 other
"""


@pytest.fixture(params=MODES)
async def sandbox(server: ServerProcess, request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(server.image, connection_config=config(server, request.param))
    execution = await sb.commands.run(SETUP)
    assert execution.exit_code == 0, execution.logs.stderr
    yield sb
    with contextlib.suppress(SandboxApiException):
        await sb.kill()
    await sb.close()


async def shell(sb: Sandbox, command: str) -> str:
    return "\n".join(stdout(await sb.commands.run(command))).strip()


async def test_a_user_works_on_its_own_files(sandbox: Sandbox) -> None:
    alice = sandbox.files_with_identity(1000, 1000)
    home = f"{D}/home"
    await alice.write_file(f"{home}/new.txt", "hello", mode=640)
    await alice.create_directories([WriteEntry(path=f"{home}/sub/deeper", mode=750)])
    assert await alice.read_file(f"{home}/new.txt") == "hello"
    assert (await alice.get_file_info([f"{home}/new.txt"]))[f"{home}/new.txt"].mode == 640
    listed = {e.path.rsplit("/", 1)[1] for e in await alice.list_directory(DirectoryListEntry(path=home))}
    assert {"new.txt", "sub", "to-shadow", "to-secret"} <= listed
    assert [e.path for e in await alice.search(SearchEntry(path=home, pattern="*.txt"))] == [f"{home}/new.txt"]
    await alice.move_files([MoveEntry(src=f"{home}/new.txt", dest=f"{home}/sub/moved.txt")])
    await alice.replace_contents(
        [ContentReplaceEntry(path=f"{home}/sub/moved.txt", old_content="hello", new_content="bye")]
    )
    await alice.set_permissions([SetPermissionEntry(path=f"{home}/sub/moved.txt", mode=600)])
    owners = await shell(sandbox, f"cd {home}/sub && stat -c '%n %u:%g %a' moved.txt deeper && cat moved.txt")
    assert owners == "moved.txt 1000:1000 600\ndeeper 1000:1000 750\nbye"
    await alice.delete_files([f"{home}/sub/moved.txt"])
    await alice.delete_directories([f"{home}/sub"])
    assert await shell(sandbox, f"ls -A {home}") == "to-secret\nto-shadow"


async def test_a_user_gets_403_for_what_it_may_not_touch_and_changes_nothing(sandbox: Sandbox) -> None:
    alice = sandbox.files_with_identity(1000, 1000)
    home = f"{D}/home"
    await alice.write_file(f"{home}/mine", "x", mode=644)
    refused: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        (f"read {p}", lambda p=p: alice.read_file(p))  # type: ignore[misc]
        for p in (f"{D}/shadow", f"{home}/to-shadow", f"{home}/../shadow", f"{D}/other", f"{home}/to-secret/f")
    ]
    refused += [
        ("read /etc/shadow-like line", lambda: alice.read_file(f"{D}/shadow", offset=1, limit=1)),
        ("overwrite shadow", lambda: alice.write_file(f"{D}/shadow", "owned")),
        ("write in a root directory", lambda: alice.write_file(f"{D}/evil", "x")),
        ("write through a link", lambda: alice.write_file(f"{home}/to-secret/evil", "x")),
        ("list secret", lambda: alice.list_directory(DirectoryListEntry(path=f"{D}/secret"))),
        ("search secret", lambda: alice.search(SearchEntry(path=f"{D}/secret", pattern="*"))),
        ("mkdir in secret", lambda: alice.create_directories([WriteEntry(path=f"{D}/secret/x", mode=755)])),
        ("delete shadow", lambda: alice.delete_files([f"{D}/shadow"])),
        ("delete secret", lambda: alice.delete_directories([f"{D}/secret"])),
        ("steal shadow", lambda: alice.move_files([MoveEntry(src=f"{D}/shadow", dest=f"{home}/stolen")])),
        ("chmod shadow", lambda: alice.set_permissions([SetPermissionEntry(path=f"{D}/shadow", mode=644)])),
        ("give a file to root", lambda: alice.set_permissions([SetPermissionEntry(path=f"{home}/mine", owner="0")])),
        ("setuid root", lambda: alice.write_file(f"{home}/mine", "x", mode=4755, owner="0", group="0")),
        (
            "edit shadow",
            lambda: alice.replace_contents([ContentReplaceEntry(path=f"{D}/shadow", old_content="s", new_content="x")]),
        ),
    ]
    for what, call in refused:
        with pytest.raises(SandboxApiException) as err:
            await call()
        assert err.value.status_code == 403, (what, err.value)
    if await shell(sandbox, "test -e /etc/shadow && echo yes") == "yes":
        with pytest.raises(SandboxApiException) as err:
            await alice.read_file("/etc/shadow")
        assert err.value.status_code == 403
    state = f"cd {D} && ls -A . home && stat -c '%n %u:%g %a' shadow home/mine && cat shadow secret/f"
    after = await shell(sandbox, state)
    assert after == (
        ".:\nhome\nother\nsecret\nshadow\n\nhome:\nmine\nto-secret\nto-shadow\n"
        "shadow 0:0 600\nhome/mine 1000:1000 644\ns3cret\ninner"
    )
    # uid 0 is root (the API's caller runs commands as root anyway): documented, not refused.
    assert await sandbox.files_with_identity(0, 0).read_file(f"{D}/shadow") == "s3cret\n"


async def test_bad_or_unmapped_ids_are_a_400(server: ServerProcess, sandbox: Sandbox) -> None:
    endpoint = await sandbox.get_endpoint(44772)
    async with httpx.AsyncClient(headers={**server.headers(), **endpoint.headers}, timeout=30) as client:
        for ids in ("abc/0", "0/-1", "4294967295/0"):
            answer = await client.get(f"http://{endpoint.endpoint}/v1/filesystem/{ids}/files/info", params={"path": D})
            assert answer.status_code == 400 and answer.json()["code"], (ids, answer.text)
    high = sandbox.files_with_identity(70000, 70000)
    if server.runtime == "local":  # the jail's user namespace maps ids 0-65535 only
        with pytest.raises(SandboxApiException) as err:
            await high.get_file_info([D])
        assert err.value.status_code == 400 and "does not exist in this sandbox" in str(err.value)
    else:
        assert (await high.get_file_info([D]))[D].mode == 755
