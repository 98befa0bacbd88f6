"""Command line: ``genaccel sample|eval|report|train|bench`` and ``python sample.py``.

Sampler-specific flags come from each sampler module's ``sampler_cli_options()`` so a new algorithm
brings its own flags; a flag that does not apply to the chosen sampler is an error, not ignored.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from genaccel.pipeline import MODELS as MODEL_FAMILIES
from genaccel.pipeline import default_sampler
from genaccel.samplers import SAMPLERS, available_samplers, sampler_class
from genaccel.utils.dtypes import DTYPES


class UsageError(Exception):
    """A user mistake, printed as one line without a traceback."""


def sampler_flag_specs() -> list[tuple[str, dict]]:
    """(flag, argparse kwargs) declared by ``sampler_cli_options()`` in the modules of the registered samplers
    (and of their base classes, so a family of samplers can declare its flags once)."""
    specs, seen_flags, seen_fns = [], set(), set()
    for name in available_samplers():
        try:
            cls = sampler_class(name)
        except ImportError:
            continue
        for klass in cls.__mro__:
            fn = getattr(sys.modules.get(klass.__module__), "sampler_cli_options", None)
            if fn is None or fn in seen_fns:
                continue
            seen_fns.add(fn)
            for flag, kwargs in fn():
                if flag not in seen_flags:
                    seen_flags.add(flag)
                    specs.append((flag, {**kwargs, "default": None}))
    return specs


def build_sample_parser(prog: str = "genaccel sample") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sample class-conditional images with a chosen sampler.")
    p.add_argument("--model", default="llamagen", help=f"model family: {', '.join(MODEL_FAMILIES)} (default: llamagen)")
    p.add_argument("--sampler", default=None,
                   help=f"one of: {', '.join(available_samplers())} (default: the model's baseline, ar or nar)")
    p.add_argument("--sampler-config", default=None, help="YAML file of sampler options (configs/samplers/*.yaml)")
    p.add_argument("--ckpt", default=None, help="GPT checkpoint (.pt or .safetensors); default: bundled model")
    p.add_argument("--vq-ckpt", default=None, help="VQ checkpoint; default: bundled tokenizer")
    p.add_argument("--gpt-model", default=None, help="GPT preset for --ckpt (GPT-B, GPT-L, ...); inferred if omitted")
    p.add_argument("--image-size", type=int, default=None, help="image size for --ckpt (256 -> 16x16 tokens)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (cycled to --num-images)")
    p.add_argument("--num-images", type=int, default=None, help="number of images (default: one per class given)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-interval", type=int, default=-1)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--out", default="outputs/samples", help="output folder (PNGs, grid.png, stats.json)")
    p.add_argument("--no-progress", action="store_true")
    for flag, kwargs in sampler_flag_specs():
        p.add_argument(flag, **kwargs)
    return p


def sampler_options(args: argparse.Namespace, specs: list[tuple[str, dict]]) -> dict[str, Any]:
    """Common options plus sampler-specific ones given on the command line or in --sampler-config."""
    opts: dict[str, Any] = dict(
        cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature,
    )
    cls = sampler_class(args.sampler)
    known = set(cls.Options.__dataclass_fields__)
    if args.sampler_config:
        import yaml

        path = Path(args.sampler_config)
        if not path.is_file():
            raise UsageError(f"sampler config not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        loaded.pop("sampler", None)
        opts.update(loaded)
    for flag, kwargs in specs:
        dest = kwargs.get("dest") or flag.lstrip("-").replace("-", "_")
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest not in known:
            raise UsageError(f"option {flag} does not apply to sampler {args.sampler!r} (its options: {sorted(known)})")
        opts[dest] = value
    return opts


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def write_outputs(out: Path, images: torch.Tensor, labels: torch.Tensor, stats: dict) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    from genaccel.utils.io import save_image, save_json

    out.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        save_image(Image.fromarray(img.numpy()), out / f"{i:05d}_class{int(lab):04d}.png")
    nrow = max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0)
    save_image(Image.fromarray(grid.numpy()), out / "grid.png")
    save_json(stats, out / "stats.json")


def run_sample(argv: list[str] | None = None, prog: str = "genaccel sample") -> dict:
    from genaccel.pipeline import labels_for, load_model

    specs = sampler_flag_specs()
    args = build_sample_parser(prog).parse_args(argv)
    if args.model not in MODEL_FAMILIES:
        raise UsageError(f"unknown model {args.model!r}; available: {', '.join(MODEL_FAMILIES)}")
    args.sampler = args.sampler or default_sampler(args.model)
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; available: {', '.join(available_samplers())}")
    if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise UsageError("--batch-size and --num-images must be >= 1")
    sampler = sampler_class(args.sampler)(**sampler_options(args, specs))
    pipe = load_model(args.model, ckpt=args.ckpt, vq_ckpt=args.vq_ckpt, gpt_model=args.gpt_model,
                      image_size=args.image_size, device=args.device, dtype=DTYPES[args.dtype])
    num_images = args.num_images or (len(args.classes) if args.classes else pipe.num_classes)
    labels = labels_for(pipe.num_classes, args.classes, num_images)
    all_images, totals = [], {"nfe": 0, "wall_time_s": 0.0, "tokens": 0}
    start = time.perf_counter()
    for chunk, images, st in pipe.generate_batches(labels, sampler, args.batch_size, args.seed, not args.no_progress):
        all_images.append(images)
        totals["nfe"] += st.nfe * len(chunk)
        totals["tokens"] += st.tokens * len(chunk)
        totals["wall_time_s"] += st.wall_time_s
    elapsed = time.perf_counter() - start
    images = torch.cat(all_images)
    stats = {
        "model": args.model, "sampler": args.sampler, "options": vars(sampler.options), "num_images": len(images),
        "batch_size": args.batch_size, "seed": args.seed, "checkpoints": pipe.info,
        "nfe_per_image": totals["nfe"] / len(images), "tokens_per_image": totals["tokens"] / len(images),
        "step_compression": totals["tokens"] / max(totals["nfe"], 1),
        "sampling_time_s": totals["wall_time_s"], "total_time_s": elapsed,
        "images_per_s": len(images) / elapsed, "device": args.device, "dtype": args.dtype,
        "environment": environment(),
    }
    write_outputs(Path(args.out), images, labels, stats)
    print(f"wrote {len(images)} images, grid.png and stats.json to {args.out} "
          f"(NFE/image {stats['nfe_per_image']:.1f}, {stats['images_per_s']:.2f} images/s)")
    return stats


def _delegate(module: str, func: str = "main"):
    def run(argv: list[str]) -> Any:
        return getattr(importlib.import_module(module), func)(argv)

    return run


COMMANDS = {
    "sample": lambda argv: run_sample(argv),
    "eval": _delegate("genaccel.eval.__main__"),
    "report": _delegate("genaccel.eval.report"),
    "train": _delegate("genaccel.train.__main__"),
    "bench": _delegate("genaccel.bench.__main__"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: genaccel {{{','.join(COMMANDS)}}} [options]  (genaccel <command> --help for details)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except (UsageError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def sample_script_main() -> int:
    """Entry of ``python sample.py``: the ``sample`` command with LlamaGen-style flags."""
    try:
        run_sample(sys.argv[1:], prog="sample.py")
    except (UsageError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0





if __name__ == "__main__":
    sys.exit(main())
