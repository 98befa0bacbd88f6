"""Eval-pipeline throughput: ``genaccel eval sample`` (sampling + packing + FD-domain) with 1 vs N processes.

``python -m genaccel.bench eval [--layouts 1x2 2x1 1x1] [--num-images 64] [--batch-size 16] [model args]``

Each layout ``PxT`` (P processes with T torch threads each) runs the real CLI under ``torchrun
--standalone`` in a fresh job directory. The default layouts 1x2, 2x1 and 1x1 separate the effect of
processes from that of threads on a 2-core machine. Reported per configuration: end-to-end wall
time of the command (process start, model load, sampling, packing, FD-domain), the job's own sampling
images/s (first to last barrier), and ratios against the first configuration, all from one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genaccel.cli import add_sampler_flags, given_sampler_options, sampler_flag_specs, typed_sampler_flags
from genaccel.eval.throughput import environment
from genaccel.utils.io import save_json


def eval_command(procs: int, threads: int, out: Path, a: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "genaccel.eval", "sample", "--out", str(out), "--num-images", str(a.num_images),
           "--batch-size", str(a.batch_size), "--threads", str(threads), "--metrics", a.metrics, "--no-progress",
           "--sampler", a.sampler]
    for flag, value in (("--ckpt", a.ckpt), ("--vq-ckpt", a.vq_ckpt), ("--image-size", a.image_size)):
        if value is not None:
            cmd += [flag, str(value)]
    for opt in a.opt:
        cmd += ["--opt", opt]
    for flag, _, value in typed_sampler_flags(a, sampler_flag_specs()):
        cmd += [flag, str(value)]
    return cmd


def parse_layout(text: str) -> tuple[int, int]:
    procs, sep, threads = text.partition("x")
    if not sep or not procs.isdigit() or not threads.isdigit() or int(procs) < 1 or int(threads) < 1:
        raise argparse.ArgumentTypeError(f"layout {text!r} must look like PxT, e.g. 2x1 (2 processes, 1 thread each)")
    return int(procs), int(threads)


def run_config(procs: int, threads: int, a: argparse.Namespace, workdir: Path) -> dict:
    """Run one process layout end to end; returns wall time, the job's speed record and its metrics."""
    out = workdir / f"p{procs}t{threads}"
    cmd = eval_command(procs, threads, out, a)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    run = json.loads((out / "run.json").read_text())
    return {"processes": procs, "threads_per_process": threads, "end_to_end_wall_s": wall,
            "end_to_end_images_per_s": a.num_images / wall, "sampling_images_per_s": run["speed"].get("images_per_s"),
            "sampling_wall_s": run["speed"]["sampling_wall_time_s"], "metrics": run["metrics"],
            "command": shlex.join(["torchrun", *cmd[3:]])}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options; a sampler flag that ``--sampler`` does not have fails here, not in every layout."""
    p = argparse.ArgumentParser(prog="python -m genaccel.bench eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", type=parse_layout, nargs="+", default=[(1, 2), (2, 1), (1, 1)],
                   help="process x thread layouts to compare (first one is the baseline)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sampler", default="ar", help="sampler of every layout (default: ar)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler option by field name, passed on to genaccel eval (same as the option's own flag)")
    p.add_argument("--metrics", default="fd_domain,class_accuracy")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--vq-ckpt", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--out", default="runs/bench_eval.json")
    add_sampler_flags(p.add_argument_group("sampler options", "as genaccel eval sample's, passed on to it"))
    a = p.parse_args(argv)
    given_sampler_options(a, sampler_flag_specs())
    return a


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        results = [run_config(n, t, a, Path(tmp)) for n, t in a.layouts]
    base = results[0]
    for r in results:
        r["end_to_end_speedup_vs_first"] = base["end_to_end_wall_s"] / r["end_to_end_wall_s"]
        if base["sampling_images_per_s"] and r["sampling_images_per_s"]:
            r["sampling_speedup_vs_first"] = r["sampling_images_per_s"] / base["sampling_images_per_s"]
    record = {"benchmark": "eval", "command": "python -m genaccel.bench eval " + shlex.join(argv),
              "num_images": a.num_images, "batch_size": a.batch_size, "sampler": a.sampler, "results": results,
              "environment": environment("cpu")}
    save_json(record, a.out)
    print(markdown_rows(results))
    return record


def markdown_rows(results: list[dict]) -> str:
    lines = ["| processes x threads | end-to-end s | end-to-end img/s | sampling img/s | speed-up (end-to-end, sampling) |",
             "|---|---|---|---|---|"]
    for r in results:
        samp = r.get("sampling_images_per_s")
        lines.append(f"| {r['processes']} x {r['threads_per_process']} | {r['end_to_end_wall_s']:.1f} | "
                     f"{r['end_to_end_images_per_s']:.2f} | {samp:.2f} | {r['end_to_end_speedup_vs_first']:.2f}x, "
                     f"{r.get('sampling_speedup_vs_first', float('nan')):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
