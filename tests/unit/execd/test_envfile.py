"""The EXECD_ENVS file the SDK's set_env writes, and the environment every command gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from opensandbox.adapters.converter.env_entry import build_set_env_command

from opensandbox_platform.execd.envfile import Environment, expand_path, parse_env_file


def test_parses_quoted_unquoted_and_export_lines() -> None:
    text = "\n".join(
        [
            "# comment",
            "A='single $HOME quoted'",
            'B="double \\"q\\" \\n $A \\$LIT"',
            "export C=bare-$A",
            "D=value # trailing comment",
            "1BAD=x",
            "no equals sign",
            "E='unterminated",
        ]
    )
    env = parse_env_file(text, {"HOME": "/root"})
    assert env == {
        "A": "single $HOME quoted",
        "B": 'double "q" \n single $HOME quoted $LIT',
        "C": "bare-single $HOME quoted",
        "D": "value",
    }


def test_later_lines_win() -> None:
    assert parse_env_file("X=1\nX=2\n") == {"X": "2"}


@pytest.mark.parametrize("value", ["plain", "with 'single' quotes", 'and "double"', "tab\tnew\nline", "$NOT_EXPANDED"])
def test_reads_back_what_the_sdk_set_env_writes(tmp_path: Path, value: str) -> None:
    # set_env's command ends with: printf '%s\n' '<entry>' >> "$EXECD_ENVS"; take that entry.
    command = build_set_env_command("KEY", value)
    entry = command.rsplit("printf '%s\\n' ", 1)[1].rsplit(" >>", 1)[0]
    assert entry.startswith("'") and entry.endswith("'")
    line = entry[1:-1].replace("'\\''", "'")
    parsed = parse_env_file(line + "\n")
    if "'" in value:  # the double-quoted form: $NAME may expand, everything else is exact
        assert parsed["KEY"] == value.replace("$NOT_EXPANDED", "")
    else:
        assert parsed["KEY"] == value


def test_environment_precedence_and_private_vars(tmp_path: Path) -> None:
    envs = tmp_path / ".env"
    envs.write_text("LAYER=file\nFROM_FILE=1\n")
    environment = Environment(str(envs), {"LAYER": "daemon", "PATH": "/bin", "EXECD_ACCESS_TOKEN": "secret"})
    environment.bootstrap = {"LAYER": "bootstrap", "FROM_BOOT": "1"}
    env = environment.compose({"LAYER": "request"})
    assert env["LAYER"] == "request"
    assert env["FROM_FILE"] == env["FROM_BOOT"] == "1"
    assert env["EXECD_ENVS"] == str(envs)
    assert "EXECD_ACCESS_TOKEN" not in env
    assert environment.compose()["LAYER"] == "file"


def test_env_file_changes_are_picked_up(tmp_path: Path) -> None:
    envs = tmp_path / ".env"
    environment = Environment(str(envs), {})
    assert "X" not in environment.compose()
    envs.write_text("X=1\n")
    assert environment.compose()["X"] == "1"
    envs.write_text("X=22\n")
    assert environment.compose()["X"] == "22"


def test_expand_path() -> None:
    env = {"HOME": "/home/u", "DIR": "/data"}
    assert expand_path("~/x", env) == "/home/u/x"
    assert expand_path("$DIR/a/${DIR}", env) == "/data/a//data"
    with pytest.raises(KeyError):
        expand_path("$MISSING/x", env)
