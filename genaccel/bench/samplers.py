"""Speed vs quality of the samplers on the bundled model: ``python -m genaccel.bench samplers``.

For every sampler, in one process (so ratios are measured in one run; samplers take turns image by
image so that load from other jobs on a shared CPU falls on all of them alike):
* latency at batch 1: median wall time per image over ``--latency-images`` runs after one warm-up;
  NFE and step compression per image from the same runs;
* throughput at batch ``--batch-size``: images/s over ``--num-images`` images, which are also scored:
  FD-domain against held-out crops and class accuracy, both with the bundled crop classifier
  (:mod:`genaccel.eval.fd`).
Writes a table into its section of docs/benchmarks.md (``samplers``, or ``samplers-bf16`` with
``--dtype bf16``), a speed-vs-quality PNG and a JSON with every number.

Besides the issue's ratios it reports where the time goes, so a shortfall can be attributed: the
*forward-cost bound* is the wall speed-up / step compression a sampler would reach with zero drafting and
engine cost (AR's time per target forward / this sampler's), and the *engine share* is the part of wall
time spent outside target and drafter forwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from genaccel.bench.sections import write_section
from genaccel.cli import SAMPLING_DEFAULTS, add_dtype_flag, add_sampler_flags, sampler_flag_specs, typed_sampler_flags
from genaccel.pipeline import FAMILIES, labels_for, load_model
from genaccel.samplers import available_samplers, build_sampler, sampler_class
from genaccel.utils.dtypes import DTYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench samplers", description=__doc__.splitlines()[0])
    p.add_argument("--samplers", default="ar,sjd,gsd,lantern,sd",
                   help="comma list of runs; 'ar' is the reference. A run is SAMPLER, or LABEL=SAMPLER[@FAMILY] for "
                        "a second configuration or another model family (e.g. zipar-j4=zipar, "
                        "ts128=token-shuffle@token-shuffle-128); --set addresses runs by label")
    p.add_argument("--num-images", type=int, default=64, help="images per sampler for throughput and quality")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the throughput run")
    p.add_argument("--latency-images", type=int, default=8, help="batch-1 runs for the latency median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="LABEL.OPTION=VALUE",
                   help="option of one run, e.g. gsd.group_size=25 (value parsed as YAML); wins over the flags below")
    p.add_argument("--ckpt", default=None, help="GPT checkpoint of the llamagen samplers (default: bundled)")
    p.add_argument("--nar-ckpt", default=None, help="NAR checkpoint of the nar sampler (default: bundled)")
    p.add_argument("--section", default=None, help="docs section to write (default samplers[-bf16])")
    p.add_argument("--vq-ckpt", default=None, help="VQ checkpoint (default: bundled)")
    p.add_argument("--classifier", default=None, help="crop classifier for FD-domain/accuracy (default: bundled)")
    p.add_argument("--reference-per-class", type=int, default=64, help="held-out crops per class for FD-domain")
    add_dtype_flag(p, choices=("fp32", "bf16"), help="GPT compute dtype (the drafter head stays fp32)")
    g = p.add_argument_group("sampler options", "as sample's flags: the shared ones apply to every run, a sampler's "
                             "own to the runs whose sampler has that option")
    add_sampler_flags(g)
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update ('' = none)")
    p.add_argument("--continuous", action="store_true",
                   help="batch-B throughput from one continuous-batching stream per sampler (generate_stream) "
                        "instead of separate batches")
    p.add_argument("--png", default=None, help="default docs/samplers_speed_quality[_bf16].png ('' = none)")
    p.add_argument("--json", default=None, help="default runs/bench_samplers[_bf16].json ('' = none)")
    return p.parse_args(argv)


def sampler_options(sets: list[str], runs: dict[str, str], typed: list[tuple[str, str, Any]] = ()
                    ) -> dict[str, dict[str, Any]]:
    """Options per run label (``runs``: label -> sampler): cfg_scale 4.0, then the sampler flags typed
    (``(flag, option, value)``; a flag that no run's sampler has is an error), then ``--set label.option=value``."""
    options: dict[str, dict[str, Any]] = {label: {"cfg_scale": SAMPLING_DEFAULTS["cfg_scale"]} for label in runs}
    for flag, dest, value in typed:
        takers = [label for label, name in runs.items() if dest in sampler_class(name).Options.__dataclass_fields__]
        if not takers:
            raise SystemExit(f"option {flag} applies to none of the runs {list(runs)}")
        for label in takers:
            options[label][dest] = value
    for item in sets:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        if name not in options or not field:
            raise SystemExit(f"--set {item!r}: expected LABEL.OPTION=VALUE with LABEL in {list(runs)}")
        options[name][field] = yaml.safe_load(value)
    return options


# The model family a sampler runs on unless its run names one (default llamagen).
SAMPLER_FAMILY = {"nar": "nar", "token-shuffle": "token-shuffle"}


def family_of(name: str) -> str:
    return SAMPLER_FAMILY.get(name, "llamagen")


def parse_runs(spec: str) -> dict[str, tuple[str, str]]:
    """``--samplers`` -> {label: (sampler, family)}; 'ar' on llamagen is always first (the reference)."""
    from genaccel.pipeline import MODELS

    runs: dict[str, tuple[str, str]] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        label, _, rest = entry.partition("=")
        sampler, _, family = (rest or label).partition("@")
        family = family or family_of(sampler)
        if sampler not in available_samplers():
            raise SystemExit(f"unknown sampler {sampler!r} in run {entry!r}; available: {available_samplers()}")
        if family not in MODELS:
            raise SystemExit(f"unknown model family {family!r} in run {entry!r}; available: {', '.join(MODELS)}")
        if label in runs:
            raise SystemExit(f"run label {label!r} appears twice in --samplers; give the second one LABEL=SAMPLER")
        runs[label] = (sampler, family)
    if runs.get("ar", ("ar", "llamagen")) != ("ar", "llamagen"):
        raise SystemExit("the label 'ar' is the reference: the ar sampler on the llamagen model")
    return {"ar": ("ar", "llamagen"), **{k: v for k, v in runs.items() if k != "ar"}}


def measure_latency(pipes: dict, samplers: dict, labels: torch.Tensor, seed: int) -> dict[str, dict]:
    """Median batch-1 wall time per sampler after one warm-up image, with per-image NFE and step compression.

    Samplers take turns image by image, so load from other jobs on a shared CPU hits all of them alike.
    """
    runs: dict[str, list] = {name: [] for name in samplers}
    for name, sampler in samplers.items():
        sampler.generate(pipes[name].gpt, labels[:1], torch.Generator().manual_seed(seed - 1))
    for i, label in enumerate(labels):
        for name, sampler in samplers.items():
            out = sampler.generate(pipes[name].gpt, label[None], torch.Generator().manual_seed(seed + i))
            runs[name].append(out.stats)
    results = {}
    for name, stats in runs.items():
        tokens = pipes[name].gpt.num_image_tokens
        nfe = statistics.mean(s.nfe for s in stats)
        accepted = sum_hists([s.extra.get("accepted_length_hist", {}) for s in stats])
        results[name] = {
            "latency_s": statistics.median(s.wall_time_s for s in stats), "nfe": nfe, "step_compression": tokens / nfe,
            "draft_time_s": statistics.mean(s.draft_time_s for s in stats),
            "target_time_s": statistics.mean(s.target_time_s for s in stats),
            "wall_time_s": statistics.mean(s.wall_time_s for s in stats),
            "accepted_length_hist": accepted,
            "mean_accepted_length": sum(a * c for a, c in accepted.items()) / max(1, sum(accepted.values())),
        }
    return results


def sum_hists(hists: list[dict]) -> dict[int, int]:
    total: dict[int, int] = {}
    for h in hists:
        for a, c in h.items():
            total[int(a)] = total.get(int(a), 0) + c
    return dict(sorted(total.items()))


def measure_throughput(pipes: dict, samplers: dict, labels: torch.Tensor, batch_size: int, seed: int,
                       continuous: bool = False) -> dict[str, tuple]:
    """Images/s over all labels at ``batch_size`` (sampling only, decode excluded) and the decoded images.

    Samplers take turns batch by batch (see :func:`measure_latency`). ``continuous``: one stream of
    ``batch_size`` rows per sampler over all labels instead (``generate_stream``; samplers take turns stream
    by stream), its forwards per batch of ``batch_size`` images as the batch NFE.
    """
    if continuous:
        out = {}
        for name, sampler in samplers.items():
            run = sampler.generate_stream(pipes[name].gpt, labels, batch_size, torch.Generator().manual_seed(seed + 1000))
            st = run.stats
            out[name] = ({"images_per_s": labels.numel() / st.wall_time_s, "nfe_per_batch": st.batch_forwards_per_image,
                          "step_compression_batch": st.step_compression},
                         torch.cat([pipes[name].decode(t) for t in run.tokens.split(batch_size)]))
        return out
    walls = dict.fromkeys(samplers, 0.0)
    nfes: dict[str, list] = {name: [] for name in samplers}
    images: dict[str, list] = {name: [] for name in samplers}
    for i, chunk in enumerate(labels.split(batch_size)):
        for name, sampler in samplers.items():
            out = sampler.generate(pipes[name].gpt, chunk, torch.Generator().manual_seed(seed + 1000 + i))
            walls[name] += out.stats.wall_time_s
            nfes[name].append(out.stats.nfe)
            images[name].append(pipes[name].decode(out.tokens))
    return {
        name: ({"images_per_s": labels.numel() / walls[name], "nfe_per_batch": statistics.mean(nfes[name]),
                "step_compression_batch": pipes[name].gpt.num_image_tokens / statistics.mean(nfes[name])},
               torch.cat(images[name]))
        for name in samplers
    }


def score(images: torch.Tensor, labels: torch.Tensor, reference, extractor) -> dict:
    from genaccel.eval.fd import class_accuracy, fd_from_stats, feature_stats

    feats = extractor.features(images)
    return {"fd_domain": fd_from_stats(feature_stats(feats), reference),
            "class_accuracy": class_accuracy(images, labels, extractor)}


def environment(threads: int, dtype: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu, "threads": threads, "dtype": dtype,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit}


def forward_cost_bound(results: dict, name: str) -> float:
    """Wall speed-up / step compression with free drafting and engine: AR's time per forward over ``name``'s."""
    per_forward = {n: r["target_time_s"] / r["nfe"] for n, r in results.items()}
    if per_forward[name] <= 0:  # a sampler that recorded no target time
        return float("nan")
    return per_forward["ar"] / per_forward[name]


def engine_share(r: dict) -> float:
    """Part of the wall time outside target and drafter forwards (sampling, verification, bookkeeping)."""
    return 1.0 - (r["target_time_s"] + r["draft_time_s"]) / max(r["wall_time_s"], 1e-9)


def markdown(results: dict, command: str, env: dict, png: str, batch_size: int, title: str) -> str:
    ar = results["ar"]
    b = batch_size
    rows = [
        ("| sampler | model | NFE/image (b=1) | step compression (b=1) | latency b=1 (s, median) | latency speed-up vs ar "
        f"| wall speed-up / step compression | forward-cost bound | images/s (b={b}) | images/s / ar (b={b}) "
        f"| step compression (b={b}) "
        "| FD-domain | FD-domain / ar | class accuracy | mean accepted length | drafter time share | engine share |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        speed = ar["latency_s"] / r["latency_s"]
        fd_ratio = r["fd_domain"] / ar["fd_domain"]
        share = r["draft_time_s"] / max(r["wall_time_s"], 1e-9)
        rows.append(
            f"| {name} | {r['family']} ({r['image_size']}px) | {r['nfe']:.1f} | {r['step_compression']:.2f}x | {r['latency_s']:.3f} "
            f"| {speed:.2f}x | {speed / r['step_compression']:.2f} | {forward_cost_bound(results, name):.2f} "
            f"| {r['images_per_s']:.2f} | {r['images_per_s'] / ar['images_per_s']:.2f}x "
            f"| {r['step_compression_batch']:.2f}x | {r['fd_domain']:.2f} | {fd_ratio:.2f} | {r['class_accuracy']:.3f} "
            f"| {r['mean_accepted_length']:.2f} | {share:.0%} | {engine_share(r):.0%} |"
        )
    opts = "; ".join(f"{n}: {json.dumps(r['options'], sort_keys=True)}" for n, r in results.items())
    return "\n".join([
        f"## {title} ({env['dtype']})",
        "",
        f"Command: `{command}`",
        "",
        (f"Environment: {env['cpu']}, {env['threads']} threads, {env['dtype']}, torch {env['torch']}, python {env['python']}, "
        f"commit {env['commit']}, {env['date_utc']}. CPU shared with other jobs: absolute times are noisy; every "
        "ratio comes from this one run."),
        "",
        *rows,
        "",
        ("NFE = target forwards per image (prefill included, one CFG batch-2 forward = 1). Step compression = "
        "image tokens (256, or 1024 at 128px) / NFE. Latency: median wall time of batch-1 images after one warm-up. FD-domain and class "
        f"accuracy: the batch-{b} images vs held-out crops of the same size (128px images and crops both "
        "resized to the classifier's 64x64, antialiased), bundled crop classifier. Forward-cost bound = AR's "
        "time per target forward / this sampler's: the wall speed-up / step compression reachable with free "
        "drafting and zero engine cost on this machine. Engine share = wall time outside target and drafter "
        f"forwards. Options: {opts}."),
        "",
        "Goals (this CPU):",
        "",
        *goal_lines(results),
        "",
        f"![speed vs quality]({Path(png).name})" if png else "",
    ])


def goal_lines(results: dict) -> list[str]:
    """The issue's targets for this CPU, checked on this run's numbers (met / NOT met)."""
    ar = results.get("ar")
    if ar is None:
        return []

    def speed(name: str) -> float:
        return ar["latency_s"] / results[name]["latency_s"]

    def fd(name: str) -> float:
        return results[name]["fd_domain"] / ar["fd_domain"]

    checks = []
    if "sjd" in results:
        checks.append((f"sjd step compression {results['sjd']['step_compression']:.2f}x >= 2.0x "
                       f"(quality: FD-domain {fd('sjd'):.2f}x ar, exact sampler)", results["sjd"]["step_compression"] >= 2.0))
    if "gsd" in results:
        checks.append((f"gsd step compression {results['gsd']['step_compression']:.2f}x >= 3.5x and FD-domain "
                       f"{fd('gsd'):.2f}x ar <= 1.15x", results["gsd"]["step_compression"] >= 3.5 and fd("gsd") <= 1.15))
    if "lantern" in results and "sd" in results:
        ratio = speed("lantern") / speed("sd")
        checks.append((f"lantern latency speed-up {speed('lantern'):.2f}x = {ratio:.2f} x sd's {speed('sd'):.2f}x "
                       f"(>= 1.75) and FD-domain {fd('lantern'):.2f}x ar <= 1.15x", ratio >= 1.75 and fd("lantern") <= 1.15))
    if "nar" in results:
        r = results["nar"]
        checks.append((f"nar {r['step_compression']:.2f}x fewer forwards than ar (>= 8.26x) at FD-domain "
                       f"{fd('nar'):.2f}x ar (<= 1.2x)", round(r["step_compression"], 2) >= 8.26 and fd("nar") <= 1.2))
        checks.append((f"nar batch-1 latency {speed('nar'):.2f}x faster than ar (>= 4x)", speed("nar") >= 4.0))
        thr = r["images_per_s"] / ar["images_per_s"]
        checks.append((f"nar images/s {thr:.2f}x ar's at the throughput batch (>= 2x)", thr >= 2.0))
    if "token-shuffle" in results:
        r = results["token-shuffle"]
        thr = r["images_per_s"] / ar["images_per_s"]
        checks.append((f"token-shuffle {r['step_compression']:.2f}x fewer forwards than ar (>= 4x) at FD-domain "
                       f"{fd('token-shuffle'):.2f}x ar (<= 1.3x), images/s {thr:.2f}x ar's (>= 2.5x)",
                       r["step_compression"] >= 4.0 and fd("token-shuffle") <= 1.3 and thr >= 2.5))
    for name, r in results.items():
        if r["sampler"] == "token-shuffle" and r["image_size"] == 128:
            checks.append((f"{name}: {r['image_size']}x{r['image_size']} images at {1 / speed(name):.2f}x ar's batch-1 "
                           f"time per image (<= 1.2x), class accuracy {r['class_accuracy']:.1%} (>= 70%)",
                           1 / speed(name) <= 1.2 and r["class_accuracy"] >= 0.7))
    for name, r in results.items():
        if r["sampler"] == "zipar":
            checks.append((f"{name} FD-domain {fd(name):.2f}x ar (<= 1.15x) at {r['nfe']:.0f} forwards, batch-1 latency "
                           f"{speed(name):.2f}x ar (> 1x)", fd(name) <= 1.15 and speed(name) > 1.0))
    for name, r in results.items():
        if name != "ar" and r["family"] == "llamagen" and r["sampler"] != "zipar":
            ratio = speed(name) / r["step_compression"]
            checks.append((f"{name} wall-clock speed-up / step compression = {ratio:.2f} >= 0.8 (forward-cost "
                           f"bound {forward_cost_bound(results, name):.2f}, engine share {engine_share(r):.0%})",
                           ratio >= 0.8))
    return [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ar = results["ar"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in results.items():
        x, y = ar["latency_s"] / r["latency_s"], r["fd_domain"]
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.axhline(1.15 * ar["fd_domain"], ls="--", lw=0.8, color="gray", label="1.15 x AR FD-domain")
    ax.set_xlabel("latency speed-up vs ar (batch 1)")
    ax.set_ylabel("FD-domain (lower is better)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = parse_runs(a.samplers)
    names = list(runs)
    options = sampler_options(a.set, {n: runs[n][0] for n in names}, typed_sampler_flags(a, sampler_flag_specs()))
    samplers = {n: build_sampler(runs[n][0], **options[n]) for n in names}

    from genaccel.eval.fd import reference_domain_stats
    from genaccel.eval.feature_extractor import load_feature_extractor

    ckpts = {"llamagen": a.ckpt, "nar": a.nar_ckpt}
    families = {family for _, family in runs.values()}
    # --vq-ckpt replaces the 64x64 VQ; a family with its own bundled VQ (token-shuffle-128) keeps that one
    vq = {f: a.vq_ckpt if FAMILIES[f].vq_asset == "vq" else None for f in families}
    loaded = {f: load_model(f, ckpt=ckpts.get(f), vq_ckpt=vq[f], dtype=DTYPES[a.dtype]) for f in sorted(families)}
    pipes = {n: loaded[runs[n][1]] for n in names}
    num_classes = pipes["ar"].num_classes
    extractor = load_feature_extractor(a.classifier)
    references = {size: reference_domain_stats(a.reference_per_class, extractor=extractor, size=size)
                  for size in sorted({pipe.image_size for pipe in pipes.values()})}
    labels = labels_for(num_classes, None, a.num_images)
    latency_labels = labels_for(num_classes, None, a.latency_images)
    latency = measure_latency(pipes, samplers, latency_labels, a.seed)
    throughput = measure_throughput(pipes, samplers, labels, a.batch_size, a.seed, a.continuous)
    results = {}
    for name, sampler in samplers.items():
        thr, images = throughput[name]
        size = pipes[name].image_size
        r = {"sampler": runs[name][0], "family": runs[name][1], "image_size": size,
             "options": dict(vars(sampler.options)), **latency[name], **thr,
             **score(images, labels, references[size], extractor)}
        results[name] = r
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)), flush=True)

    command = "python -m genaccel.bench samplers " + " ".join(shlex.quote(x) for x in argv)
    env = environment(a.threads, a.dtype)
    suffix = "" if a.dtype == "fp32" else f"_{a.dtype}"
    json_path = f"runs/bench_samplers{suffix}.json" if a.json is None else a.json
    png = f"docs/samplers_speed_quality{suffix}.png" if a.png is None else a.png
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"command": command, "env": env, "results": results}, indent=2, default=str))
    if png:
        plot(results, Path(png))
    if a.doc:
        section = a.section or f"samplers{suffix.replace('_', '-')}"
        title = "Samplers: speed vs quality (bundled models)"
        if a.continuous:
            title += f", batch {a.batch_size} as one continuous-batching stream"
        write_section(section, markdown(results, command, env, png, a.batch_size, title), Path(a.doc))
    written = [f"section {section!r} of {a.doc}"] if a.doc else []
    written += [f for f in (png, json_path) if f]
    if written:  # say so: a quick check run with the defaults rewrites the recorded section
        print("wrote " + ", ".join(written) + " ('' for --doc/--png/--json writes none)", flush=True)
    return results


if __name__ == "__main__":
    main()
