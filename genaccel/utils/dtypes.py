"""Compute dtypes by name, one table for every command line.

Both spellings are accepted everywhere (``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``);
the short one is canonical: it is what ``--help`` lists and what stats.json, run records, job files and
benchmark section names store.
"""

from __future__ import annotations

import argparse

import torch

# Canonical names first: the order ``--help`` lists them in.
CANONICAL: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPES: dict[str, torch.dtype] = {**CANONICAL, **{alias: CANONICAL[name] for alias, name in ALIASES.items()}}
DTYPE_NAMES: tuple[str, ...] = tuple(CANONICAL)


def canonical_dtype(name: str) -> str:
    """The canonical spelling of a dtype name in either spelling (``'bfloat16'`` -> ``'bf16'``)."""
    key = str(name).removeprefix("torch.")
    if key in CANONICAL:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)} "
                     f"(or {', '.join(ALIASES)})")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a torch dtype (``torch.bfloat16`` -> ``'bf16'``)."""
    return canonical_dtype(str(dtype))


def dtype_arg(text: str) -> str:
    """argparse ``type=`` for ``--dtype``: either spelling in, the canonical one out (then ``choices`` applies)."""
    try:
        return canonical_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
