"""``python -m genaccel.bench <name> [options]``: runs ``genaccel.bench.<name>.main(argv)``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] not in names:
        raise SystemExit(f"usage: python -m genaccel.bench {{{','.join(names)}}} [options]")
    importlib.import_module(f"genaccel.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
