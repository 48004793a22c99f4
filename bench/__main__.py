"""`python -m bench [NAME ...]`: run the benchmarks (all by default). NAME is a module bench/NAME_bench.py."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(p.stem.removesuffix("_bench") for p in Path(__file__).parent.glob("*_bench.py"))


def main(argv: list[str]) -> None:
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown or "-h" in names or "--help" in names:
        print(__doc__)
        print("available:", ", ".join(available()))
        sys.exit(2 if unknown else 0)
    for name in names:
        print(f"== bench {name} ==", flush=True)
        importlib.import_module(f"bench.{name}_bench").main([])


if __name__ == "__main__":
    main(sys.argv[1:])
