"""Command lines of the small daemons, read before anything else at start-up.

`parse` reads the common forms (`--flag value`, `--flag=value`, known flags only) without argparse,
and hands anything else (`--help`, an abbreviation, a bad value) to argparse, built from the same
options, for its usage text and errors: argparse with gettext and locale is ~3 ms of every start
that a daemon run with a correct command line has no use for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace

TYPE_CHECKING = False  # (not typing's: importing typing costs a daemon 2 ms; mypy knows the name)
if TYPE_CHECKING:
    import argparse
    from typing import Any

Args = SimpleNamespace  # what `parse` returns: one attribute per option (argparse's names)


class Option:
    """One `--flag` with a value (as argparse's add_argument takes it)."""

    __slots__ = ("choices", "default", "dest", "flag", "help", "metavar", "type")

    def __init__(
        self,
        flag: str,
        default: Any = None,
        *,
        type: Callable[[str], Any] = str,
        choices: Sequence[str] | None = None,
        help: str = "",
        metavar: str | None = None,
        dest: str | None = None,
    ) -> None:
        self.flag = flag
        self.dest = dest or flag.removeprefix("--").replace("-", "_")
        self.default = default
        self.type = type
        self.choices = choices
        self.help = help
        self.metavar = metavar


def parse(argv: Sequence[str] | None, prog: str, description: str, options: Sequence[Option]) -> Args:
    """The options' values from `argv` (default sys.argv[1:]), as argparse would give them."""
    args = list(sys.argv[1:] if argv is None else argv)
    values = _fast(args, options)
    if values is None:
        return Args(**vars(argparser(prog, description, options).parse_args(args)))
    return Args(**values)


def _fast(args: list[str], options: Sequence[Option]) -> dict[str, Any] | None:
    """The values when `args` holds only known flags in their exact spelling with valid values,
    else None (argparse decides)."""
    by_flag = {o.flag: o for o in options}
    values = {o.dest: o.default for o in options}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        option = by_flag.get(flag)
        if option is None:
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            i += 1
        i += 1
        if value.startswith("-") and not eq:  # argparse's rules for such values are its own
            return None
        try:
            converted = option.type(value)
        except (TypeError, ValueError):
            return None
        if option.choices is not None and converted not in option.choices:
            return None
        values[option.dest] = converted
    return values


def argparser(prog: str, description: str, options: Sequence[Option]) -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_options(parser, options)
    return parser


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for o in options:
        parser.add_argument(
            o.flag, dest=o.dest, default=o.default, type=o.type, choices=o.choices, help=o.help, metavar=o.metavar
        )


# The listener's limits every small daemon takes (daemon/http.py's Limits): (flag, Limits field,
# type, default, what it is); the environment variable is <PREFIX>_<FLAG in upper snake case>.
LIMIT_FLAGS: tuple[tuple[str, str, type, float, str], ...] = (
    (
        "max-connections",
        "max_connections",
        int,
        1024,
        "connections held at once; the longest idle is closed for a new one",
    ),
    ("header-timeout", "head_timeout", float, 10.0, "seconds a request's head may take to arrive (408 after)"),
    ("keepalive-timeout", "keep_alive_timeout", float, 60.0, "seconds an idle connection is kept between requests"),
    ("max-header-bytes", "max_head_bytes", int, 64 * 1024, "largest request head (431 above)"),
    ("max-request-line", "max_request_line", int, 8 * 1024, "longest request line (414 above)"),
)
LIMIT_DEFAULTS = {name: default for _, name, _, default, _ in LIMIT_FLAGS}


def limit_options(env_prefix: str, env: Mapping[str, str] = os.environ) -> list[Option]:
    """The listener's limits as options (dest `limit_<field>`), each defaulting to `<env_prefix>_<FLAG>`."""
    options = []
    for flag, name, kind, default, help_text in LIMIT_FLAGS:
        variable = f"{env_prefix}_{flag.upper().replace('-', '_')}"
        raw = env.get(variable)
        options.append(
            Option(
                f"--{flag}",
                kind(raw) if raw else default,
                type=kind,
                dest=f"limit_{name}",
                metavar="SECONDS" if kind is float else "N",
                help=f"{help_text} (env {variable}; default {default:g})",
            )
        )
    return options


def limit_values(args: Any) -> dict[str, Any]:
    """The limits' values from parsed arguments, by Limits field."""
    return {name: getattr(args, f"limit_{name}") for _, name, _, _, _ in LIMIT_FLAGS}


def _help_formatter_class() -> type:
    import argparse

    class _HelpFormatter(argparse.HelpFormatter):
        def __init__(self, prog: str) -> None:
            super().__init__(prog, width=_columns() - 2)  # as argparse: 2 columns of margin

    return _HelpFormatter


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size finds it, without importing shutil (it
    imports bz2 and lzma, which a daemon that must start in a few tens of milliseconds and idle small
    has no other use for)."""
    try:
        return max(int(os.environ.get("COLUMNS", "")), 20)
    except ValueError:
        pass
    try:
        return max(os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80, 20)
    except (OSError, ValueError):
        return 80


def HelpFormatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter without `import shutil` for the terminal width."""
    formatter: argparse.HelpFormatter = _help_formatter_class()(prog)
    return formatter
