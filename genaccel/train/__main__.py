"""``python -m genaccel.train {vq,gpt,classifier,drafter,nar,token-shuffle,flextok} --config configs/train/<name>.yaml``."""

from __future__ import annotations

import importlib
import sys

RECIPES = {"vq": "genaccel.train.vq", "gpt": "genaccel.train.gpt", "classifier": "genaccel.train.classifier",
           "drafter": "genaccel.train.drafter", "nar": "genaccel.train.nar",
           "token-shuffle": "genaccel.train.token_shuffle", "flextok": "genaccel.train.flextok"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in RECIPES:
        raise SystemExit(f"usage: python -m genaccel.train {{{','.join(RECIPES)}}} --config FILE [--set key=value]")
    importlib.import_module(RECIPES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
