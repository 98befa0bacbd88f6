"""Shared pieces of the training recipes: config files, resumable checkpoints, logging, the LlamaGen
optimiser, the crop stream of a resumed run, and the export of trained weights."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from genaccel.data.skimage_crops import RandomCropStream
from genaccel.models import load_gpt
from genaccel.utils.io import save_json, save_safetensors, save_torch


def parse_config(argv: list[str] | None, defaults: dict[str, Any], prog: str) -> dict[str, Any]:
    """Defaults < --config YAML < ``--set key=value`` overrides (values parsed as YAML)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", type=str, default=None, help="YAML file with recipe fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field")
    a = p.parse_args(argv)
    cfg = dict(defaults)
    if a.config:
        path = Path(a.config)
        if not path.is_file():
            raise SystemExit(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        unknown = set(loaded) - set(defaults)
        if unknown:
            raise SystemExit(f"unknown fields in {path}: {sorted(unknown)}; known: {sorted(defaults)}")
        cfg.update(loaded)
    for item in a.set:
        key, _, value = item.partition("=")
        if key not in defaults:
            raise SystemExit(f"unknown field {key!r}; known: {sorted(defaults)}")
        cfg[key] = yaml.safe_load(value)
    return cfg


def start_run(argv: list[str] | None, defaults: dict[str, Any], name: str) -> tuple[dict[str, Any], Path, logging.Logger]:
    """Every recipe's preamble: config, output folder and log, seed and thread count, in that order."""
    cfg = parse_config(argv, defaults, f"python -m genaccel.train {name}")
    out = Path(cfg["out_dir"])
    log = make_logger(out, name)
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    return cfg, out, log


def make_logger(out_dir: Path, name: str) -> logging.Logger:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"genaccel.train.{name}")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(out_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, cfg: dict, **extra) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "steps": step, "args": cfg, **extra}
    save_torch(state, path)


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["steps"]), state


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    import math

    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def stop_reason(step: int, cfg: dict, start: float) -> str:
    """Why a recipe should stop early at ``step`` ('' = keep going): ``stop_at`` or the ``max_minutes`` budget."""
    if cfg.get("stop_at") is not None and step >= cfg["stop_at"]:
        return f"stop_at={cfg['stop_at']} reached (LR schedule spans {cfg['steps']} steps)"
    if (time.time() - start) / 60 > cfg["max_minutes"]:
        return f"time budget of {cfg['max_minutes']} min reached at step {step}; stopping early"
    return ""


def resume(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, log: logging.Logger) -> int:
    """Load ``ckpt`` into model and optimizer if it exists; the step to continue from (0 for a fresh run)."""
    if not ckpt.exists():
        return 0
    step, _ = load_checkpoint(ckpt, model, opt)
    log.info(f"resumed from {ckpt} at step {step}")
    return step


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def checkpoint_or_stop(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, cfg: dict, start: float,
    log: logging.Logger,
) -> bool:
    """Save ``last.pt`` every ``ckpt_every`` steps, at the end, and before an early stop; True = stop now."""
    stop = stop_reason(step, cfg, start)
    if stop or step % cfg["ckpt_every"] == 0 or step == cfg["steps"]:
        save_checkpoint(ckpt, model, opt, step, cfg)
    if stop:
        log.info(stop)
    return bool(stop)


def llamagen_adamw(model: torch.nn.Module, cfg: dict) -> torch.optim.AdamW:
    """LlamaGen's optimiser (train_c2i.py ``creat_optimizer``): AdamW with betas (0.9, 0.95) at ``cfg['lr']``,
    weight decay ``cfg['weight_decay']`` on parameters with two or more dimensions and none on the rest."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=(0.9, 0.95),
    )


def load_gpt_for_tokens(path: str, tokens: torch.Tensor) -> torch.nn.Module:
    """The GPT at ``path`` (an initialisation), refused unless its grid has one position per token of a row of
    ``tokens``: a GPT trained on another VQ grid would be fine-tuned on sequences of the wrong length."""
    gpt = load_gpt(path)
    if gpt.num_image_tokens != tokens.shape[1]:
        raise SystemExit(f"GPT grid has {gpt.num_image_tokens} tokens but the VQ gives {tokens.shape[1]}")
    return gpt


def crop_stream(cfg: dict, step: int, crop_size: int) -> tuple[RandomCropStream, torch.Generator]:
    """The training crops and the recipe's noise generator for a run that starts (or resumes) at ``step``: both
    seeded from ``cfg['seed']`` and the step, so a resumed run goes on with fresh draws instead of replaying
    the first steps' ones."""
    stream = RandomCropStream("train", seed=cfg["seed"] * 1000 + step, crop_size=crop_size)
    return stream, torch.Generator().manual_seed(cfg["seed"] + step)


def float16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict stored as float16, as the bundled GPT-family assets ship (loading upcasts)."""
    return {k: v.half() for k, v in model.state_dict().items()}


def export_weights(state: dict[str, torch.Tensor], meta: dict[str, str], record: dict, out: Path, stem: str,
                   export_path: str) -> None:
    """Write ``out/{stem}.safetensors`` (``meta`` as its metadata) and the run's ``record`` to
    ``out/{stem}_metrics.json``; when ``export_path`` is set, the same weights there and the record next to them
    (same name, ``.json``), the pair a bundled asset ships as."""
    save_safetensors(state, out / f"{stem}.safetensors", metadata=meta)
    save_json(record, out / f"{stem}_metrics.json")
    if export_path:
        save_safetensors(state, export_path, metadata=meta)
        save_json(record, Path(export_path).with_suffix(".json"))


@torch.no_grad()
def mean_token_nll(model: torch.nn.Module, tokens: torch.Tensor, logits_of: Callable[..., torch.Tensor],
                   *columns: torch.Tensor) -> float:
    """Mean per-token NLL (nats) of ``tokens``, 128 rows at a time: ``logits_of(rows, *column_rows)`` gives the
    rows' logits (``columns`` are split alongside, e.g. the labels); the model is in eval mode meanwhile."""
    model.eval()
    total, count = 0.0, 0
    for toks, *cols in zip(tokens.split(128), *(c.split(128) for c in columns)):
        logits = logits_of(toks, *cols)
        total += F.cross_entropy(logits.flatten(0, 1), toks.flatten(), reduction="sum").item()
        count += toks.numel()
    model.train()
    return total / count
