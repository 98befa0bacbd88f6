"""Command line: ``genaccel sample|eval|report|train|bench`` and ``python sample.py``.

Sampler-specific flags come from each sampler module's ``sampler_cli_options()`` so a new algorithm
brings its own flags; a flag that does not apply to the chosen sampler is an error, not ignored.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from genaccel.pipeline import MODELS as MODEL_FAMILIES
from genaccel.pipeline import default_sampler
from genaccel.samplers import SAMPLERS, available_samplers, sampler_class
from genaccel.utils.dtypes import DTYPE_NAMES, DTYPES, dtype_arg


class UsageError(Exception):
    """A user mistake, printed as one line without a traceback."""


class Interrupted(Exception):
    """Ctrl-C during a command: printed as one line, exit status 130."""


# Exit statuses of every command (sample, eval, report, train, bench), as argparse uses 2 for bad usage.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# Options common to all samplers: the command line's defaults (LlamaGen's sample_c2i.py values).
SAMPLING_DEFAULTS: dict[str, Any] = dict(cfg_scale=4.0, cfg_interval=-1, top_k=0, top_p=1.0, temperature=1.0)
# Files of a previous run in an --out folder: numbered PNGs, grid.png, stats.json.
RUN_FILE = re.compile(r"^(\d{5}_class\d{4}\.png|grid\.png|stats\.json)$")
OUT_NOTE = ("--out must be a folder you can write to; one that already holds a previous run's images "
            "(NNNNN_classCCCC.png, grid.png, stats.json) is refused unless --overwrite is given, which removes "
            "those files once sampling has succeeded, just before the new ones are written. Nothing is "
            "written until all images are sampled (an error or Ctrl-C leaves --out as it was).")


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
    p = argparse.ArgumentParser(prog=prog, description="Sample class-conditional images with a chosen sampler.",
                                epilog=OUT_NOTE)
    p.add_argument("--model", default="llamagen", help=f"model family: {', '.join(MODEL_FAMILIES)} (default: llamagen)")
    p.add_argument("--sampler", default=None,
                   help=f"one of: {', '.join(available_samplers())} (default: the --sampler-config file's "
                        "sampler, else the model's baseline, ar or nar)")
    p.add_argument("--sampler-config", default=None,
                   help="YAML file of sampler options (configs/samplers/*.yaml); flags you type win over it")
    p.add_argument("--ckpt", default=None, help="GPT checkpoint (.pt or .safetensors) (default: bundled model)")
    p.add_argument("--vq-ckpt", default=None, help="VQ checkpoint (default: bundled tokenizer)")
    p.add_argument("--gpt-model", default=None,
                   help="GPT preset for --ckpt (GPT-B, GPT-L, ...; NAR-B, ... for --model nar) (default: inferred)")
    p.add_argument("--image-size", type=int, default=None, help="image size for --ckpt (256 -> 16x16 tokens)")
    p.add_argument("--n-head", type=int, default=None,
                   help="attention heads of a custom-size --ckpt without a stored config (shapes cannot tell it)")
    p.add_argument("--num-tokens", type=int, default=None,
                   help="--model flextok: generate and decode the first K of its 1-D tokens, K forwards "
                        "(default: all 64)")
    p.add_argument("--decoder", choices=("direct", "flow"), default=None,
                   help="--model flextok: the one-pass decoder (direct, default) or the rectified-flow decoder (flow)")
    p.add_argument("--decode-steps", type=int, default=8, help="--decoder flow: Euler steps (default: 8)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (cycled to --num-images)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="--model llamagen-t2i: a text prompt (repeat for more; cycled to --num-images)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="--model llamagen-t2i: a UTF-8 text file, one prompt per line (after any --prompt)")
    p.add_argument("--t5-path", default=None, metavar="DIR",
                   help="--model llamagen-t2i: local folder of its T5 encoder and tokenizer (flan-t5-xl for the "
                        "official checkpoints); never downloaded")
    p.add_argument("--num-images", type=int, default=None, help="number of images (default: one per class given)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled together per batch (default: 8)")
    p.add_argument("--continuous-batching", action="store_true",
                   help="speculative samplers: keep --batch-size rows in flight over all images, a complete "
                        "image's row taking the next label (fewer forwards per image than separate batches; "
                        "images differ from the batched run's for the same seed, their distribution does not)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    add_dtype_flag(p)
    p.add_argument("--out", default="outputs/samples",
                   help="output folder for the numbered PNGs, grid.png and stats.json (default: outputs/samples)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --out (its numbered PNGs, grid.png, stats.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampler_flags(p)
    return p


def add_dtype_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: str = "fp32",
                   choices: tuple[str, ...] = DTYPE_NAMES, help: str = "model dtype") -> None:
    """``--dtype`` as every command takes it: fp32/bf16/fp16 or float32/bfloat16/float16, stored canonical (short)."""
    p.add_argument("--dtype", default=default, type=dtype_arg, choices=choices,
                   help=f"{help}: {', '.join(choices)} (float32, bfloat16, float16 also accepted) (default: {default})")


def add_sampler_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The sampler option flags shared by ``sample``, ``eval sample|throughput`` and the sampler benchmarks:
    the options every sampler has, then each sampler's own (``sampler_cli_options()``); all default to None so
    that only what the user typed overrides the config file or the sampler's defaults."""
    d = SAMPLING_DEFAULTS
    p.add_argument("--cfg-scale", type=float, default=None,
                   help=f"classifier-free guidance scale; 1.0 = no guidance (default: {d['cfg_scale']})")
    p.add_argument("--cfg-interval", type=int, default=None,
                   help=f"guidance only for tokens 0..N+1, conditional logits after; -1 = every token (default: {d['cfg_interval']})")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"sample among the k most likely tokens; 0 = no top-k filter (default: {d['top_k']})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus sampling: keep the most likely tokens up to this total probability; "
                        f"1.0 = off (default: {d['top_p']})")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"softmax temperature; 0 = greedy (argmax) (default: {d['temperature']})")
    for flag, kwargs in sampler_flag_specs():
        p.add_argument(flag, **kwargs)


def resolve_sampler(args: argparse.Namespace) -> dict[str, Any]:
    """Set ``args.sampler`` (flag, else the --sampler-config file's ``sampler:``, else the model's baseline) and
    return the file's options ({} without a file)."""
    from genaccel.samplers.speculative import read_sampler_config

    file_sampler, file_opts = None, {}
    if args.sampler_config:
        file_sampler, file_opts = read_sampler_config(args.sampler_config)
    if args.sampler and file_sampler and args.sampler != file_sampler:
        raise UsageError(f"--sampler {args.sampler} contradicts 'sampler: {file_sampler}' in {args.sampler_config}; "
                         "drop --sampler or use a config file for that sampler")
    args.sampler = args.sampler or file_sampler or default_sampler(args.model)
    return file_opts


def sampler_options(args: argparse.Namespace, specs: list[tuple[str, dict]],
                    file_opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Options in increasing precedence: the command line's defaults, the --sampler-config file, the flags given."""
    return {**SAMPLING_DEFAULTS, **given_sampler_options(args, specs, file_opts)}


def given_sampler_options(args: argparse.Namespace, specs: list[tuple[str, dict]],
                          file_opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a command line sets (the --sampler-config file's, then the flags typed, which win); a
    sampler-specific flag that ``args.sampler`` does not have is a UsageError."""
    opts: dict[str, Any] = dict(file_opts or {})
    known = set(sampler_class(args.sampler).Options.__dataclass_fields__)
    for flag, dest, value in typed_sampler_flags(args, specs):
        if dest not in known:
            raise UsageError(f"option {flag} does not apply to sampler {args.sampler!r} (its options: {sorted(known)})")
        opts[dest] = value
    return opts


def typed_sampler_flags(args: argparse.Namespace, specs: list[tuple[str, dict]]) -> list[tuple[str, str, Any]]:
    """(flag, option name, value) of each sampler option flag of :func:`add_sampler_flags` that was given."""
    shared = [("--" + dest.replace("_", "-"), {"dest": dest}) for dest in SAMPLING_DEFAULTS]
    typed = []
    for flag, kwargs in shared + specs:
        dest = kwargs.get("dest") or flag.lstrip("-").replace("-", "_")
        if getattr(args, dest, None) is not None:
            typed.append((flag, dest, getattr(args, dest)))
    return typed


def check_device(name: str) -> None:
    """One clear line for a device this machine does not have (instead of a traceback mid-load)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown --device {name!r}: expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU was found"
            raise UsageError(f"--device {name}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:  # noqa: BLE001 - any backend failure is the same user-facing problem
            raise UsageError(f"--device {name} is not usable here ({type(e).__name__}); use --device cpu") from None


def check_gpt_model(model: str, gpt_model: str | None, ckpt: str | None) -> None:
    """--gpt-model must name a preset of the model family, and only applies to --ckpt."""
    if gpt_model is None:
        return
    from genaccel.models import GPT_PRESETS, NAR_PRESETS
    from genaccel.models.llamagen import T2I_PRESETS

    presets = {"llamagen": (GPT_PRESETS, gpt_model), "nar": (NAR_PRESETS, gpt_model.replace("GPT-", "NAR-")),
               "llamagen-t2i": (T2I_PRESETS, gpt_model)}
    if model not in presets:
        raise UsageError(f"--gpt-model does not apply to --model {model} (its checkpoints carry their config)")
    table, name = presets[model]
    if name not in table:
        raise UsageError(f"unknown --gpt-model {gpt_model!r} for --model {model}; available: {', '.join(table)}")
    if ckpt is None:
        raise UsageError(f"--gpt-model {gpt_model} applies only with --ckpt (the bundled {model} model stores its "
                         "own config)")


def check_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of a text-to-image --model (read before any model loads), None for a class-conditional one;
    prompt flags on a class model and --classes on a text model are usage errors."""
    from genaccel.models.t2i import read_prompts
    from genaccel.pipeline import FAMILIES

    text = FAMILIES[args.model].conditioning == "text"
    given = [flag for flag, v in (("--prompt", args.prompt), ("--prompts-file", args.prompts_file),
                                  ("--t5-path", args.t5_path)) if v is not None]
    if not text:
        if given:
            raise UsageError(f"{given[0]} is for a text-to-image model (--model llamagen-t2i); --model {args.model} "
                             "is class-conditional: use --classes")
        return None
    if args.classes is not None:
        raise UsageError(f"--model {args.model} is text-conditional: give --prompt / --prompts-file, not --classes")
    return read_prompts(args.prompt, args.prompts_file)


def previous_run_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_file() and RUN_FILE.match(p.name)) if out.is_dir() else []


def check_out(out: Path, overwrite: bool) -> None:
    """Fail before sampling when --out is a file, not writable, or holds a previous run (without --overwrite)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file, not a folder; give a folder path")
    old = previous_run_files(out)
    if old and not overwrite:
        raise UsageError(f"--out {out} already holds a previous run ({len(old)} files: numbered PNGs, grid.png, "
                         "stats.json); pass --overwrite to replace it, or choose another folder")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"--out {out}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".genaccel-write-check.", dir=base)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {base} is not writable ({e.strerror or e})") from None


# Options whose 'auto' value a sampler resolves at run time and reports in its stats' extra (stats.json).
RESOLVED_OPTIONS = ("drafter_precision",)


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def write_outputs(out: Path, images: torch.Tensor, labels: torch.Tensor, stats: dict, overwrite: bool = False) -> None:
    """Write everything into a staging folder beside ``out``, then move it into place: an error or Ctrl-C
    leaves no half-written run. With ``overwrite`` the previous run's files in ``out`` are removed first."""
    from PIL import Image
    from torchvision.utils import make_grid

    from genaccel.utils.io import save_image, save_json

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for i, (img, lab) in enumerate(zip(images, labels)):
            save_image(Image.fromarray(img.numpy()), stage / f"{i:05d}_class{int(lab):04d}.png")
        nrow = max(1, math.ceil(math.sqrt(len(images))))
        grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0)
        save_image(Image.fromarray(grid.numpy()), stage / "grid.png")
        save_json(stats, stage / "stats.json")
        if not out.exists():
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp creates 0700
            os.replace(stage, out)
            return
        if overwrite:
            for old in previous_run_files(out):
                old.unlink()
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def family_defaults(args: argparse.Namespace, file_opts: dict[str, Any]) -> dict[str, Any]:
    """The --sampler-config options over the model family's own sampler defaults (pipeline.Family), those
    limited to options the chosen sampler has; typed flags win over both (sampler_options)."""
    from genaccel.pipeline import FAMILIES

    known = {f.name for f in fields(sampler_class(args.sampler).Options)}
    own = {k: v for k, v in FAMILIES[args.model].sampler_defaults.items() if k in known}
    return {**own, **file_opts}


def run_sample(argv: list[str] | None = None, prog: str = "genaccel sample") -> dict:
    from genaccel.pipeline import labels_for, load_model

    specs = sampler_flag_specs()
    args = build_sample_parser(prog).parse_args(argv)
    if args.model not in MODEL_FAMILIES:
        raise UsageError(f"unknown model {args.model!r}; available: {', '.join(MODEL_FAMILIES)}")
    file_opts = resolve_sampler(args)
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; available: {', '.join(available_samplers())}")
    if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise UsageError("--batch-size and --num-images must be >= 1")
    check_gpt_model(args.model, args.gpt_model, args.ckpt)
    prompts = check_prompts(args)
    check_device(args.device)
    out = Path(args.out)
    check_out(out, args.overwrite)
    sampler = sampler_class(args.sampler)(**sampler_options(args, specs, family_defaults(args, file_opts)))
    pipe = load_model(args.model, ckpt=args.ckpt, vq_ckpt=args.vq_ckpt, gpt_model=args.gpt_model,
                      image_size=args.image_size, device=args.device, dtype=DTYPES[args.dtype],
                      num_tokens=args.num_tokens, n_head=args.n_head, decoder=args.decoder,
                      decode_steps=args.decode_steps, t5_path=args.t5_path)
    if prompts:  # text-to-image: labels are prompt indices (file names' "class" part is the prompt's index)
        pipe.set_prompts(prompts)
        labels = labels_for(len(prompts), None, args.num_images or len(prompts))
    else:
        num_images = args.num_images or (len(args.classes) if args.classes else pipe.num_classes)
        labels = labels_for(pipe.num_classes, args.classes, num_images)
    all_images, totals, resolved = [], {"nfe": 0, "image_nfe": 0.0, "wall_time_s": 0.0, "tokens": 0}, {}
    start = time.perf_counter()
    try:
        for chunk, images, st in pipe.generate_batches(labels, sampler, args.batch_size, args.seed,
                                                       not args.no_progress, args.continuous_batching):
            all_images.append(images)
            totals["nfe"] += st.batch_forwards_per_image * len(chunk)  # a stream: forwards per batch slot
            totals["image_nfe"] += st.forwards_per_image * len(chunk)  # ragged batches: images leave early
            totals["tokens"] += st.tokens * len(chunk)
            totals["wall_time_s"] += st.wall_time_s
            resolved.update({k: st.extra[k] for k in RESOLVED_OPTIONS if k in st.extra})
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {sum(len(i) for i in all_images)} of {len(labels)} images; "
                          f"nothing was written to {out}") from None
    elapsed = time.perf_counter() - start
    images = torch.cat(all_images)
    stats = {
        "model": args.model, "sampler": args.sampler, "options": vars(sampler.options), "num_images": len(images),
        "batch_size": args.batch_size, "continuous_batching": args.continuous_batching, "seed": args.seed,
        "checkpoints": pipe.info,
        "nfe_per_image": totals["image_nfe"] / len(images), "tokens_per_image": totals["tokens"] / len(images),
        "step_compression": totals["tokens"] / max(totals["image_nfe"], 1),
        "batch_nfe_per_image": totals["nfe"] / len(images),  # forwards of the batches each image was in
        "step_compression_batch": totals["tokens"] / max(totals["nfe"], 1),
        "sampling_time_s": totals["wall_time_s"], "total_time_s": elapsed,
        "images_per_s": len(images) / elapsed, "device": args.device, "dtype": args.dtype,
        "environment": environment(),
    }
    if resolved:  # what an 'auto' option became on this machine (e.g. drafter_precision auto -> int8)
        stats["resolved_options"] = resolved
    if prompts:
        stats["prompts"] = prompts
    try:
        write_outputs(out, images, labels, stats, args.overwrite)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while writing; {out} was left as it was before this run") from None
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


COMMAND_HELP = {
    "sample": "sample class-conditional images (same flags as python sample.py)",
    "eval": "resumable sampling jobs, FD-domain / FID / IS / precision-recall, throughput, stats",
    "report": "table + speed-vs-quality plot across sampler runs",
    "train": "training recipes of the bundled weights (genaccel train <recipe> --config FILE)",
    "bench": "benchmarks recorded in docs/benchmarks.md (genaccel bench <name> ...)",
}


def top_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: genaccel {{{','.join(COMMANDS)}}} [options]", "",
             "Fast sampling for LlamaGen-class AR image generators.", "", "commands:"]
    lines += [f"  {name:<{width}}  {COMMAND_HELP[name]}" for name in COMMANDS]
    lines += ["", "genaccel <command> --help shows a command's options."]
    return "\n".join(lines)


# Exceptions that mean bad input, exit 2: besides UsageError, values the code rejects and the OSErrors of a
# path the user gave (other OSErrors, e.g. disk full or an I/O error, are failures while running, exit 1).
USAGE_ERRORS = (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError)


def run_command(fn: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run a command's ``main(argv)`` and return its exit status, the one convention of every entry point:

    0 done; 2 bad input or usage (UsageError, ValueError, TypeError, a missing or unwritable path, argparse's
    own errors, and ``SystemExit("message")``, how the recipes and benchmarks reject a config while staying
    callable from Python); 1 a failure while running (other OSErrors in one line, anything else with its
    traceback); 130 Ctrl-C. Errors print as one ``error: ...`` line on stderr.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        fn(argv)
    except USAGE_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"{e}" if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK  # argparse: 0 after --help, 2 after its usage message
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - a bug or a runtime failure: keep the traceback, exit 1
        traceback.print_exc()
        return EXIT_FAILURE
    return EXIT_OK


def _one_line(e: BaseException) -> str:
    """Errors print as one line, except checkpoint mismatches, whose key lists are their point."""
    from genaccel.models import CheckpointError

    text = str(e) or type(e).__name__
    return text if isinstance(e, CheckpointError) else " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(top_help())
        return EXIT_OK
    if not argv:
        print(top_help(), file=sys.stderr)
        return EXIT_USAGE
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (genaccel --help)",
              file=sys.stderr)
        return EXIT_USAGE
    return run_command(COMMANDS[argv[0]], argv[1:])


def sample_script_main() -> int:
    """Entry of ``python sample.py``: the ``sample`` command with LlamaGen-style flags."""
    return run_command(lambda argv: run_sample(argv, prog="sample.py"))


if __name__ == "__main__":
    sys.exit(main())
