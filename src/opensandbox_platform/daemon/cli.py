"""Command lines of the small daemons."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter without `import shutil` for the terminal width: argparse makes one for
    every add_argument, and shutil imports bz2 and lzma, which a daemon that must start in a few tens
    of milliseconds and idle small has no other use for."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
            except (OSError, ValueError):
                columns = 80
        super().__init__(prog, width=max(columns, 20) - 2)  # as argparse: 2 columns of margin
