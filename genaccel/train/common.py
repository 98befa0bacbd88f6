"""Shared pieces of the training recipes: config files, resumable checkpoints, logging."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from genaccel.utils.io import save_torch


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
