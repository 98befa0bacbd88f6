"""Strict checkpoint loading for LlamaGen GPT and VQ weights.

The official scripts load the GPT with ``strict=False``, so a wrong key silently loads nothing. Here
every load is strict: a mismatch raises :class:`CheckpointError` listing missing, unexpected and
shape-mismatched keys, and naming the preset that would fit when one does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

WRAPPER_KEYS = ("model", "ema", "module", "state_dict")
IGNORED_KEYS = ("freqs_cis",)  # old LlamaGen checkpoints carry the RoPE table; it is recomputed here
PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with what is wrong and how to fix it."""


def read_state_dict(path: str | os.PathLike, prefer: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a ``.pt``/``.pth``/``.bin`` (weights_only) or ``.safetensors`` file.

    Accepts ``{'model': sd}``, ``{'ema': sd}``, ``{'module': sd}``, ``{'state_dict': sd}`` or a bare state
    dict. ``prefer='ema'`` picks EMA weights when both are present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (check the path, or omit it to use the bundled model)")
    meta: dict = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            sd = _unwrap(obj, prefer, path)
    except CheckpointError:
        raise
    except Exception as e:  # truncated file, not a checkpoint, pickled code objects...
        raise CheckpointError(_read_error(path, e)) from e
    return _clean(sd), meta


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _read_error(path: Path, e: Exception) -> str:
    """One line saying why ``path`` could not be read (never PyTorch's multi-paragraph weights_only text)."""
    text = ANSI.sub("", str(e))
    if "Weights only load failed" in text or "weights_only" in text:
        found = UNSUPPORTED_GLOBAL.search(text)
        what = f"a pickled Python object ({found.group(1)})" if found else "pickled Python objects"
        return (f"cannot read checkpoint {path}: it holds {what} besides tensors, which safe loading "
                "(weights_only=True) refuses; if you trust the file, re-save it as a plain state dict "
                "(README: 'Checkpoints that carry args')")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (f"cannot read checkpoint {path}: {type(e).__name__}: {first} "
            "(is the file complete? re-download or re-export it)")


def _unwrap(obj, prefer: str | None, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if prefer and prefer in obj and isinstance(obj[prefer], dict):
        return obj[prefer]
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(
        f"{path} has top-level keys {sorted(obj)[:8]}: expected a state dict or one of {list(WRAPPER_KEYS)}"
    )


# K/V buffers of the official KVCache, present in checkpoints saved after `setup_caches()`: runtime state.
CACHE_BUFFER = re.compile(r"layers\.\d+\.attention\.kv_cache\.[kv]_cache$")


def _clean(sd: dict) -> dict[str, torch.Tensor]:
    out, cache_keys = {}, 0
    for k, v in sd.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        if k in IGNORED_KEYS:
            continue
        if CACHE_BUFFER.match(k):
            cache_keys += 1
            continue
        out[k] = v
    if cache_keys:
        print(f"note: ignored {cache_keys} KV-cache buffers (layers.N.attention.kv_cache.*) saved with the "
              "checkpoint; they are runtime state, not weights", file=sys.stderr)
    return out


def diff_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, shape mismatches as (key, expected, got)) against the model's state dict."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        (k, tuple(own[k].shape), tuple(sd[k].shape)) for k in set(own) & set(sd) if own[k].shape != sd[k].shape
    )
    return missing, unexpected, mismatched


def _preview(items: list, n: int = 6) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_strict(
    model: nn.Module, sd: dict[str, torch.Tensor], source: str, suggest: Callable[[dict], str | None] | None = None
) -> nn.Module:
    """Copy ``sd`` into ``model`` or raise one error listing every problem and the preset that would fit."""
    missing, unexpected, mismatched = diff_state_dict(model, sd)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys: {_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_preview(unexpected)}")
        if mismatched:
            lines.append("  shape mismatches (key, model, checkpoint): " + _preview(mismatched))
        hint = suggest(sd) if suggest else None
        lines.append(f"  fix: {hint}" if hint else "  fix: build the model with the config the checkpoint was trained with")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
    return model


def config_from_metadata(meta: dict) -> dict | None:
    """Model config stored by genaccel in safetensors metadata (key 'config'), if any."""
    raw = meta.get("config")
    return json.loads(raw) if raw else None
