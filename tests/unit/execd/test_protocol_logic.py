"""execd's protocol logic: the token check, run-request validation and the session end-of-run marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import same_secret as _same
from opensandbox_platform.execd.commands import parse_run_request
from opensandbox_platform.execd.envfile import Environment
from opensandbox_platform.execd.sessions import MarkerScanner, _RunScanner

SHELL = ["/bin/bash", "--noprofile", "--norc", "-c"]


def test_token_comparison() -> None:
    assert _same("token", "token")
    assert not _same("token", "tokem")
    assert not _same("", "token")
    assert not _same("token-longer", "token")


@pytest.fixture
def environment(tmp_path: Path) -> Environment:
    return Environment(str(tmp_path / ".env"), {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_run_request_string_and_argv(environment: Environment, tmp_path: Path) -> None:
    spec = parse_run_request({"command": "echo hi"}, environment, str(tmp_path), SHELL)
    assert spec.argv == [*SHELL, "echo hi"] and spec.content == "echo hi" and spec.cwd == str(tmp_path)
    spec = parse_run_request(
        {"argv": ["ls", "a b"], "cwd": "~", "timeout": 500, "envs": {"K": "v"}, "background": True},
        environment,
        "/",
        SHELL,
    )
    assert spec.argv == ["ls", "a b"] and spec.content == "ls 'a b'"
    assert spec.cwd == str(tmp_path) and spec.timeout_ms == 500 and spec.background and spec.env["K"] == "v"


def test_run_request_uid_defaults_gid_to_the_users_group(environment: Environment) -> None:
    spec = parse_run_request({"command": "id", "uid": 0}, environment, "/", SHELL)
    assert (spec.uid, spec.gid) == (0, 0)


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"command": "   "},
        {"command": "a", "argv": ["a"]},
        {"argv": []},
        {"argv": [""]},
        {"argv": ["a", 1]},
        {"command": "a\0b"},
        {"command": "a", "timeout": -1},
        {"command": "a", "timeout": True},
        {"command": "a", "uid": "0"},
        {"command": "a", "gid": 0},
        {"command": "a", "background": "yes"},
        {"command": "a", "envs": {"A B": "x"}},
        {"command": "a", "envs": {"A": 1}},
        {"command": "a", "cwd": "/definitely/not/here"},
        {"command": "a", "cwd": "$NOPE_NOT_SET"},
        {"command": "a", "cwd": 5},
    ],
)
def test_run_request_rejects_bad_input(environment: Environment, body: object) -> None:
    with pytest.raises(ApiError) as err:
        parse_run_request(body, environment, "/", SHELL)
    assert err.value.status == 400 and err.value.message


def test_marker_scanner_passes_output_and_finds_marker_across_reads() -> None:
    scanner = MarkerScanner(b"__TOKEN__")
    assert scanner.feed(b"hello __TO") == (b"hello ", None)  # holds back what may start the marker
    assert scanner.feed(b"KEN__:0:/tmp\n") == (b"", b":0:/tmp\n")
    assert scanner.found


def test_marker_scanner_releases_a_false_start() -> None:
    scanner = MarkerScanner(b"__TOKEN__")
    assert scanner.feed(b"a__") == (b"a", None)
    assert scanner.feed(b"x") == (b"__x", None)


def test_run_scanner_reads_exit_code_and_cwd() -> None:
    scanner = _RunScanner(b"__T__")
    assert scanner.feed("stdout", b"out\n__T__:7:/wo") == b"out\n"
    assert not scanner.done
    assert scanner.feed("stdout", b"rk dir\n") == b""
    assert scanner.feed("stderr", b"err\n__T__\n") == b"err\n"
    assert scanner.done
    assert scanner.result() == (7, "/work dir")
