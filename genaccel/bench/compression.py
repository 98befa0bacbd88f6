"""Step compression at batch 1 and at batch B, NFE only: ``python -m genaccel.bench compression``.

What ragged batches are judged by (issue #14 item 1: at batch 8 a speculative sampler should keep >= 0.9x
its batch-1 step compression), and the quick check of a sampler's compression (item 2: ``mcsjd`` >= 3.0x at
cfg 4). Each run samples the same ``--num-images`` labels once one by one and once in batches of
``--batch-size``, and reports

* step compression at batch 1: tokens per image / mean NFE per image;
* step compression at batch B: tokens per image / mean NFE per batch (a batch forward counts once, however
  many rows it carries) and its ratio to batch 1;
* row step compression at batch B: tokens per row-forward, i.e. counting a forward once per row it still
  carries -- the compute measure, since complete rows leave a ragged batch;
* wall seconds per image at both batch sizes (no quality metrics; ``bench samplers`` has those);
* with ``--continuous``, the same labels once more as one continuous-batching stream of ``--batch-size``
  rows (``generate_stream``: a complete image's row takes the next label): its step compression per batch
  forward (tokens per image / (stream forwards x batch size / images), prefills of refilled rows counted)
  and its ratio to batch 1.

Prints a Markdown table (and writes JSON with ``--json``); nothing is written into the docs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from genaccel.bench.samplers import parse_runs, sampler_options
from genaccel.cli import add_dtype_flag, add_sampler_flags, sampler_flag_specs, typed_sampler_flags
from genaccel.pipeline import labels_for, load_model
from genaccel.samplers import build_sampler
from genaccel.utils.dtypes import DTYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench compression", description=__doc__.splitlines()[0])
    p.add_argument("--samplers", default="sjd,gsd,lantern,sd",
                   help="comma list of runs, SAMPLER or LABEL=SAMPLER (as in bench samplers; ar is added as reference)")
    p.add_argument("--num-images", type=int, default=8, help="images per run at each batch size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="LABEL.OPTION=VALUE",
                   help="option of one run, e.g. mcsjd.window=24 (value parsed as YAML)")
    p.add_argument("--ckpt", default=None, help="GPT checkpoint (default: bundled)")
    add_dtype_flag(p, choices=("fp32", "bf16"), help="GPT compute dtype")
    add_sampler_flags(p.add_argument_group("sampler options", "as sample's flags"))
    p.add_argument("--continuous", action="store_true",
                   help="also run the labels as one continuous-batching stream of --batch-size rows")
    p.add_argument("--json", default="", help="write every number to this JSON file ('' = none)")
    return p.parse_args(argv)


def measure(model, sampler, labels: torch.Tensor, batch_size: int, seed: int) -> dict[str, float]:
    """Mean NFE per call, row-forwards, and wall time over ``labels`` split into batches of ``batch_size``."""
    nfes, row_steps, wall = [], 0, 0.0
    for i, chunk in enumerate(labels.split(batch_size)):
        tic = time.perf_counter()
        out = sampler.generate(model, chunk, torch.Generator().manual_seed(seed + i))
        wall += time.perf_counter() - tic
        nfes.append(out.stats.nfe)
        row_steps += out.stats.extra.get("row_verify_steps", (out.stats.nfe - 1) * chunk.numel()) + chunk.numel()
    N = model.num_image_tokens
    return {"nfe": statistics.mean(nfes), "step_compression": N / statistics.mean(nfes),
            "row_step_compression": N * labels.numel() / row_steps, "wall_s_per_image": wall / labels.numel()}


def measure_stream(model, sampler, labels: torch.Tensor, batch_size: int, seed: int) -> dict[str, float]:
    """The numbers of :func:`measure` for one continuous-batching stream of ``batch_size`` rows over ``labels``."""
    tic = time.perf_counter()
    out = sampler.generate_stream(model, labels, batch_size, torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - tic
    st, N = out.stats, model.num_image_tokens
    return {"nfe": st.batch_forwards_per_image, "step_compression": st.step_compression,
            "row_step_compression": N * labels.numel() / (st.extra.get("row_verify_steps", 0) + labels.numel()),
            "wall_s_per_image": wall / labels.numel(), "stream_forwards": st.nfe,
            "prefill_forwards": st.extra.get("prefill_forwards", 0), "continuous": bool(st.extra.get("continuous"))}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = parse_runs(a.samplers)
    options = sampler_options(a.set, {n: runs[n][0] for n in runs}, typed_sampler_flags(a, sampler_flag_specs()))
    pipe = load_model("llamagen", ckpt=a.ckpt, dtype=DTYPES[a.dtype])
    labels = labels_for(pipe.num_classes, None, a.num_images)
    results = {}
    for name, (sampler_name, family) in runs.items():
        if family != "llamagen":
            raise SystemExit(f"run {name!r}: this benchmark runs the llamagen family only")
        sampler = build_sampler(sampler_name, **options[name])
        one = measure(pipe.gpt, sampler, labels, 1, a.seed)
        many = measure(pipe.gpt, sampler, labels, a.batch_size, a.seed + 1000)
        results[name] = {"options": dict(vars(sampler.options)), "batch_1": one, f"batch_{a.batch_size}": many,
                         "ratio": many["step_compression"] / one["step_compression"]}
        line = (f"{name}: b=1 {one['step_compression']:.2f}x, b={a.batch_size} {many['step_compression']:.2f}x "
                f"({results[name]['ratio']:.2f} of b=1), rows {many['row_step_compression']:.2f}x")
        if a.continuous:
            stream = measure_stream(pipe.gpt, sampler, labels, a.batch_size, a.seed + 2000)
            results[name].update(continuous=stream, continuous_ratio=stream["step_compression"] / one["step_compression"])
            line += f", continuous {stream['step_compression']:.2f}x ({results[name]['continuous_ratio']:.2f} of b=1)"
        print(line, flush=True)
    command = "python -m genaccel.bench compression " + " ".join(shlex.quote(x) for x in argv)
    print(markdown(results, a.batch_size, command))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": command, "results": results}, indent=2, default=str))
    return results


def markdown(results: dict, batch_size: int, command: str) -> str:
    """The table docs/speculative.md quotes (continuous-batching columns when the runs have them)."""
    b = f"batch_{batch_size}"
    stream = any("continuous" in r for r in results.values())
    extra_head = (f" continuous b={batch_size} | continuous / b=1 | s/image continuous |" if stream else "")
    lines = [f"Command: `{command}`", "",
             f"| run | step compression b=1 | step compression b={batch_size} | b={batch_size} / b=1 | "
             f"row step compression b={batch_size} | s/image b=1 | s/image b={batch_size} |" + extra_head,
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if stream else "")]
    for name, r in results.items():
        one, many = r["batch_1"], r[b]
        row = (f"| {name} | {one['step_compression']:.2f}x | {many['step_compression']:.2f}x | {r['ratio']:.2f} | "
               f"{many['row_step_compression']:.2f}x | {one['wall_s_per_image']:.3f} | {many['wall_s_per_image']:.3f} |")
        if stream:
            c = r.get("continuous")
            row += (f" {c['step_compression']:.2f}x | {r['continuous_ratio']:.2f} | {c['wall_s_per_image']:.3f} |"
                    if c else " - | - | - |")
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
