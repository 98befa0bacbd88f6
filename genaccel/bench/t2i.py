"""Samplers on the bundled tiny text-to-image model: ``python -m genaccel.bench t2i``.

The prompts are the held-out wordings of the bundled photos' captions (``HELDOUT_TEMPLATES`` in
:mod:`genaccel.train.gpt_t2i`; the model never saw these strings), one per photo, so prompt i asks for photo
class i and the bundled crop classifier can say whether an image shows what its prompt asked for. Per sampler,
in one process, as ``bench samplers`` measures them (samplers take turns image by image): batch-1 latency, NFE
and step compression; images/s at ``--batch-size``; FD-domain against held-out crops and prompt accuracy (the
classifier's class = the prompt's photo; chance is 1/16).

Sampler options are the t2i family's (LlamaGen's ``sample_t2i.py``: cfg 7.5, top-k 1000) unless a flag or
``--set`` names them. Writes the section ``t2i-bundled`` of docs/benchmarks.md and a JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from genaccel.bench.samplers import (
    engine_share,
    environment,
    measure_latency,
    measure_throughput,
    sampler_options,
    score,
)
from genaccel.bench.sections import write_section
from genaccel.cli import add_dtype_flag, add_sampler_flags, sampler_flag_specs, typed_sampler_flags
from genaccel.pipeline import FAMILIES, labels_for, load_model
from genaccel.samplers import available_samplers, build_sampler
from genaccel.utils.dtypes import DTYPES

FAMILY = "llamagen-t2i"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench t2i", description=__doc__.splitlines()[0])
    p.add_argument("--samplers", default="ar,sjd,mcsjd,gsd,lantern",
                   help="comma list of samplers on the t2i model; ar (the reference) is always run first")
    p.add_argument("--num-images", type=int, default=32, help="images per sampler for throughput and quality")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the throughput run")
    p.add_argument("--latency-images", type=int, default=8, help="batch-1 runs for the latency median")
    p.add_argument("--template", type=int, default=0, help="which held-out caption wording (0 or 1) the prompts use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="SAMPLER.OPTION=VALUE",
                   help="option of one run, e.g. gsd.group_size=25 (value parsed as YAML); wins over the flags")
    p.add_argument("--ckpt", default=None, help="t2i GPT (default: the bundled tiny model)")
    p.add_argument("--classifier", default=None, help="crop classifier for FD-domain/accuracy (default: bundled)")
    p.add_argument("--reference-per-class", type=int, default=64, help="held-out crops per class for FD-domain")
    add_dtype_flag(p, choices=("fp32", "bf16"), help="GPT compute dtype")
    add_sampler_flags(p.add_argument_group("sampler options", "as sample's flags"))
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update ('' = none)")
    p.add_argument("--section", default="t2i-bundled", help="docs section to write")
    p.add_argument("--json", default="runs/bench_t2i.json", help="JSON with every number ('' = none)")
    return p.parse_args(argv)


def heldout_prompts(template: int) -> list[str]:
    """One prompt per bundled photo, in class order, in a wording the model was not trained on."""
    from genaccel.train.gpt_t2i import HELDOUT_TEMPLATES, captions

    if not 0 <= template < len(HELDOUT_TEMPLATES):
        raise SystemExit(f"--template must be in 0..{len(HELDOUT_TEMPLATES) - 1}, got {template}")
    return captions(HELDOUT_TEMPLATES[template:template + 1])


def run_options(a: argparse.Namespace, runs: dict[str, str]) -> dict[str, dict]:
    """Family defaults (cfg 7.5, top-k 1000), then the typed flags and ``--set`` (which win)."""
    typed = typed_sampler_flags(a, sampler_flag_specs())
    options = sampler_options(a.set, runs, typed)
    given = {dest for _, dest, _ in typed}
    for label in runs:
        set_here = {item.partition("=")[0].partition(".")[2] for item in a.set if item.startswith(label + ".")}
        for key, value in FAMILIES[FAMILY].sampler_defaults.items():
            if key not in given and key not in set_here:
                options[label][key] = value
    return options


def markdown(results: dict, command: str, env: dict, prompts: list[str], batch_size: int) -> str:
    ar = results["ar"]
    b = batch_size
    rows = [f"| run | NFE/image (b=1) | step compression (b=1) | latency b=1 (s) | latency speed-up vs ar "
            f"| images/s (b={b}) | images/s / ar | step compression (b={b}) | FD-domain | FD-domain / ar "
            "| prompt accuracy | drafter share | engine share |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        speed = ar["latency_s"] / r["latency_s"]
        rows.append(f"| {name} | {r['nfe']:.1f} | {r['step_compression']:.2f}x | {r['latency_s']:.3f} | {speed:.2f}x "
                    f"| {r['images_per_s']:.2f} | {r['images_per_s'] / ar['images_per_s']:.2f}x "
                    f"| {r['step_compression_batch']:.2f}x | {r['fd_domain']:.2f} | {r['fd_domain'] / ar['fd_domain']:.2f} "
                    f"| {r['class_accuracy']:.3f} | {r['draft_time_s'] / max(r['wall_time_s'], 1e-9):.0%} "
                    f"| {engine_share(r):.0%} |")
    opts = "; ".join(f"{n}: {json.dumps(r['options'], sort_keys=True)}" for n, r in results.items())
    return "\n".join([
        f"## Samplers on the bundled text-to-image model ({env['dtype']})",
        "",
        f"Command: `{command}`",
        "",
        (f"Environment: {env['cpu']}, {env['threads']} threads, {env['dtype']}, torch {env['torch']}, "
         f"commit {env['commit']}, {env['date_utc']}. Ratios come from this one run."),
        "",
        *rows,
        "",
        ("Model: `genaccel/assets/llamagen_t2i_tiny.safetensors` (docs/models.md, \"Text-to-image\"), 64x64, 16 "
         "caption slots of all-MiniLM-L6-v2 features. Prompts (held-out wording, one per photo, cycled): "
         + ", ".join(f"`{p}`" for p in prompts[:4]) + f", ... ({len(prompts)} in all). Prompt accuracy: the bundled "
         "crop classifier's class equals the prompt's photo (chance 0.0625). FD-domain: the batch-"
         f"{b} images vs held-out crops of all photos. NFE, step compression, latency, drafter and engine "
         f"share as in the section \"samplers\". Options: {opts}."),
    ])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    names = ["ar", *[s.strip() for s in a.samplers.split(",") if s.strip() and s.strip() != "ar"]]
    unknown = [n for n in names if n not in available_samplers()]
    if unknown:
        raise SystemExit(f"unknown sampler(s) {unknown}; available: {available_samplers()}")
    options = run_options(a, {n: n for n in names})
    samplers = {n: build_sampler(n, **options[n]) for n in names}

    from genaccel.eval.fd import reference_domain_stats
    from genaccel.eval.feature_extractor import load_feature_extractor

    pipe = load_model(FAMILY, ckpt=a.ckpt, dtype=DTYPES[a.dtype])
    prompts = heldout_prompts(a.template)
    pipe.set_prompts(prompts)
    for sampler in samplers.values():
        pipe.prepare_sampler(sampler)
    pipes = dict.fromkeys(names, pipe)
    extractor = load_feature_extractor(a.classifier)
    reference = reference_domain_stats(a.reference_per_class, extractor=extractor, size=pipe.image_size)
    labels = labels_for(len(prompts), None, a.num_images)
    latency = measure_latency(pipes, samplers, labels_for(len(prompts), None, a.latency_images), a.seed)
    throughput = measure_throughput(pipes, samplers, labels, a.batch_size, a.seed)
    results = {}
    for name, sampler in samplers.items():
        thr, images = throughput[name]
        results[name] = {"sampler": name, "options": dict(vars(sampler.options)), **latency[name], **thr,
                         **score(images, labels, reference, extractor)}
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[name].items() if isinstance(v, float)),
              flush=True)
    command = "python -m genaccel.bench t2i " + " ".join(shlex.quote(x) for x in argv)
    env = environment(a.threads, a.dtype)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": command, "env": env, "prompts": prompts, "results": results},
                                           indent=2, default=str))
    if a.doc:
        write_section(a.section, markdown(results, command, env, prompts, a.batch_size), Path(a.doc))
    return results


if __name__ == "__main__":
    main()
