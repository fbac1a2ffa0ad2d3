"""`python -m bench <name> [args]`: run ``bench/<name>.py``'s ``main(argv)``.

Each benchmark is its own module with ``main(argv: list[str]) -> int``; adding one never touches
this file. Benchmarks are never part of the test suite's pass/fail.
"""

import importlib
import pkgutil
import sys
from pathlib import Path


def _available() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench <name> [args...]\n\nbenchmarks: " + ", ".join(_available()))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _available():
        print(f"unknown benchmark {name!r}; available: {', '.join(_available())}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
