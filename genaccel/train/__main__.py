"""``python -m genaccel.train {vq,gpt,classifier,drafter,nar,token-shuffle,flextok,gpt-t2i} --config configs/train/<name>.yaml``."""

from __future__ import annotations

import importlib
import sys

RECIPES = {"vq": "genaccel.train.vq", "gpt": "genaccel.train.gpt", "classifier": "genaccel.train.classifier",
           "drafter": "genaccel.train.drafter", "nar": "genaccel.train.nar",
           "token-shuffle": "genaccel.train.token_shuffle", "flextok": "genaccel.train.flextok",
           "gpt-t2i": "genaccel.train.gpt_t2i"}


def usage() -> str:
    return (f"usage: genaccel train {{{','.join(RECIPES)}}} --config FILE [--set key=value]\n"
            "(genaccel train <recipe> --help for a recipe's options; recipes: docs/models.md)")


def main(argv: list[str] | None = None) -> None:
    """Run a recipe's ``main``; --help prints the recipes (exit 0), no recipe or an unknown one is bad usage (2)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return
    if not argv:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    if argv[0] not in RECIPES:
        raise SystemExit(f"unknown training recipe {argv[0]!r}; available: {', '.join(RECIPES)}")
    importlib.import_module(RECIPES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    from genaccel.cli import run_command

    sys.exit(run_command(main))
