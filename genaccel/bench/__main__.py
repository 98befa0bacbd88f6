"""``python -m genaccel.bench <name> [options]``: runs ``genaccel.bench.<name>.main(argv)``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

# Modules of this package that are helpers for the benchmarks, not benchmarks themselves.
HELPERS = frozenset({"sections"})


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.name.startswith("_") and m.name not in HELPERS)


def usage(names: list[str]) -> str:
    return (f"usage: python -m genaccel.bench {{{','.join(names)}}} [options]\n"
            "(python -m genaccel.bench <name> --help for a benchmark's options; results: docs/benchmarks.md)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if argv and argv[0] in ("-h", "--help"):
        print(usage(names))
        return
    if not argv:
        print(usage(names), file=sys.stderr)
        raise SystemExit(2)
    if argv[0] not in names:
        print(f"error: unknown benchmark {argv[0]!r}; available: {', '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(f"genaccel.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    from genaccel.cli import run_command

    sys.exit(run_command(main))
