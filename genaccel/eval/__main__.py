"""``genaccel eval`` / ``python -m genaccel.eval``: sample, score and time image generators.

Subcommands::

    sample      sample N images (any model + sampler), resumable, multi-process under torchrun,
                pack an ADM .npz, compute metrics, write run.json
    metrics     metrics of an existing ADM .npz or image folder
    throughput  latency at batch 1 and images/s at a batch size, written as a run JSON
    stats       reference statistics (mu/sigma .npz) of an image set: FD-domain or Inception features

Distributed: ``torchrun --standalone --nproc_per_node=2 -m genaccel.eval sample ...`` (gloo on CPU, nccl
on GPU). Re-running a killed ``sample`` command resumes it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from genaccel.cli import (
    UsageError,
    add_dtype_flag,
    add_sampler_flags,
    given_sampler_options,
    resolve_sampler,
    run_command,
    sampler_flag_specs,
)
from genaccel.utils.dtypes import DTYPES
from genaccel.utils.io import stored_path

RUN_SCHEMA = "genaccel.run/1"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and sampler")
    g.add_argument("--model", default="llamagen", help="model family (default: llamagen)")
    g.add_argument("--ckpt", default=None, help="GPT checkpoint (default: the bundled tiny model)")
    g.add_argument("--vq-ckpt", default=None, help="VQ checkpoint (default: the bundled tiny VQ)")
    g.add_argument("--gpt-model", default=None, help="GPT preset name for checkpoints without a stored config")
    g.add_argument("--image-size", type=int, default=None, help="image size the GPT was trained at")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    add_dtype_flag(g)
    g.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's choice)")
    g.add_argument("--sampler", default=None,
                   help="sampler name (see genaccel.samplers.available_samplers()) (default: the --sampler-config "
                        "file's sampler, else the model's baseline, ar or nar)")
    g.add_argument("--sampler-config", default=None,
                   help="YAML file of sampler options (configs/samplers/*.yaml); flags you type win over it")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler option by its field name, value parsed as YAML (repeatable), e.g. --opt "
                        "window=8; the same as the option's own flag (--window 8)")
    add_sampler_flags(g)


def _add_metric_args(p: argparse.ArgumentParser, default: str = "auto") -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default=default,
                   help="comma list of fd_domain,class_accuracy,fid,sfid,is,prc,fd,kid,dc (prc = precision, recall, "
                        "F-score; dc = density, coverage; prc/fd/kid/dc on --feature-extractor); 'auto' = FD-domain "
                        "+ class accuracy, plus IS with --inception-weights, plus FID (and sFID where the reference "
                        "has what it needs) with --reference too, and with a reference holding images prc + dc on a "
                        "--feature-extractor other than domain (fd too if it is not inception); 'none' to skip")
    g.add_argument("--feature-extractor", default="auto", metavar="NAME",
                   help="network for prc/fd/kid/dc: domain (bundled crop classifier, vs --domain-reference), "
                        "inception (--inception-weights), clip:DIR or dinov2:DIR (a local transformers "
                        "save_pretrained folder, vs --reference images); auto = inception with Inception weights, "
                        "else domain (default: auto)")
    g.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets (default: 100, torch-fidelity's)")
    g.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID: features per subset and side, at most the smaller set (default: 1000, torch-fidelity's)")
    g.add_argument("--domain-reference", default="heldout",
                   help="FD-domain reference: 'heldout' (bundled held-out crops), a mu/sigma .npz, or images")
    g.add_argument("--reference", default=None, help="Inception reference: ADM reference .npz (mu/sigma[, arr_0]) or image folder")
    g.add_argument("--inception-weights", default=None,
                   help="local torch-fidelity Inception weights (.pth); or set GENACCEL_INCEPTION_WEIGHTS. Never downloaded")
    g.add_argument("--classifier", default=None, help="crop classifier weights (default: the bundled one)")
    g.add_argument("--is-protocol", default="adm", choices=["adm", "torch-fidelity"],
                   help="IS splits: adm = in-order splits of 5000 (the ADM evaluator, paper tables), torch-fidelity "
                        "= 10 shuffled splits (default: adm)")
    g.add_argument("--prc-dtype", default="fp32", choices=["fp32", "fp16"],
                   help="precision/recall distances: fp32, or fp16 with fp32 fallback as the ADM evaluator "
                        "(default: fp32)")
    g.add_argument("--feature-batch-size", type=int, default=32,
                   help="images per feature-extraction batch (Inception, crop classifier) (default: 32)")
    g.add_argument("--cache-dir", default=None,
                   help="reference feature cache, keyed by content hash (default: $GENACCEL_CACHE_DIR, else "
                        "~/.cache/genaccel/eval); 'none' disables it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genaccel eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample N images, pack an ADM .npz, compute metrics (resumable)")
    s.add_argument("--out", required=True, help="job directory (shards/, samples.npz, run.json)")
    s.add_argument("--num-images", type=int, required=True)
    s.add_argument("--batch-size", type=int, default=16, help="images per shard and per sampler call")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--labels", default="balanced", choices=["balanced", "random"],
                   help="balanced: classes cycled in order; random: uniform draws with the seed")
    s.add_argument("--classes", type=int, nargs="*", default=None, help="restrict to these class ids")
    s.add_argument("--latency-repeats", type=int, default=0, help="also time batch-1 latency (median of N; 0 = skip)")
    s.add_argument("--continuous-batching", action="store_true",
                   help="speculative samplers: stream all of a process's shards with --batch-size rows in "
                        "flight, a complete image's row taking the next label, each shard written when complete "
                        "(fewer forwards per image; recorded in the job, so a resumed job keeps it)")
    s.add_argument("--name", default=None, help="run name in reports (default: the sampler name)")
    s.add_argument("--no-progress", action="store_true")
    _add_model_args(s)
    _add_metric_args(s)

    m = sub.add_parser("metrics", help="metrics of an existing ADM .npz or image folder")
    m.add_argument("samples", help="ADM .npz (arr_0, optional arr_1 labels) or a folder of images")
    m.add_argument("--out", default=None, help="write the metrics JSON here")
    _add_metric_args(m)

    t = sub.add_parser("throughput", help="latency at batch 1 and images/s at --batch-size")
    t.add_argument("--out", required=True, help="run JSON to write")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--num-batches", type=int, default=3)
    t.add_argument("--repeats", type=int, default=5, help="timed batch-1 calls (median reported)")
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--no-decode", action="store_true", help="time token sampling only (no VQ decode)")
    t.add_argument("--name", default=None)
    _add_model_args(t)

    r = sub.add_parser("stats", help="write reference statistics (mu, sigma) of an image set")
    r.add_argument("images", help="ADM .npz (arr_0), image folder, or 'heldout' (bundled held-out crops)")
    r.add_argument("--out", required=True, help="stats .npz to write")
    r.add_argument("--features", default="domain", choices=["domain", "inception"])
    r.add_argument("--per-class", type=int, default=64, help="held-out crops per class for 'heldout'")
    r.add_argument("--inception-weights", default=None)
    r.add_argument("--classifier", default=None)
    r.add_argument("--batch-size", type=int, default=32, help="images per feature-extraction batch")
    return parser


def parse_options(items: list[str]) -> dict[str, Any]:
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"sampler option {item!r} must look like KEY=VALUE (e.g. cfg_scale=4.0)")
        opts[key] = yaml.safe_load(value)
    return opts


def sampler_options_given(a: argparse.Namespace) -> dict[str, Any]:
    """Set ``a.sampler`` and return the options the command line sets (the --sampler-config file's, then the
    flags and ``--opt KEY=VALUE`` items typed, which win); unset options keep the sampler's defaults.
    The same option given as a flag and as ``--opt`` with two values is an error."""
    file_opts = resolve_sampler(a)
    typed = given_sampler_options(a, sampler_flag_specs())
    items = parse_options(a.opt)
    clash = sorted(k for k in set(typed) & set(items) if typed[k] != items[k])
    if clash:
        raise UsageError(f"sampler option(s) {clash} given twice with different values (a flag and --opt)")
    return {**file_opts, **items, **typed}


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if spec == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(spec)


def model_spec(a: argparse.Namespace) -> dict:
    """How the pipeline is built, as the job file records it (paths absolute, dtype canonical)."""
    from genaccel.eval.job import canonical_model_spec

    return canonical_model_spec({"model": a.model, "ckpt": a.ckpt, "vq_ckpt": a.vq_ckpt, "gpt_model": a.gpt_model,
                                 "image_size": a.image_size, "dtype": a.dtype})


def load_pipeline(a: argparse.Namespace, device: torch.device):
    from genaccel.pipeline import load_model

    return load_model(a.model, ckpt=a.ckpt, vq_ckpt=a.vq_ckpt, gpt_model=a.gpt_model, image_size=a.image_size,
                      device=device, dtype=DTYPES[a.dtype])


def command_line(argv: list[str]) -> str:
    return "genaccel eval " + shlex.join(argv)


def _metric_kwargs(a: argparse.Namespace) -> dict:
    from genaccel.eval.cache import resolve_cache_dir
    from genaccel.eval.metrics import FeatureMetricOptions

    return {"domain_ref": a.domain_reference, "reference": a.reference, "inception_weights": a.inception_weights,
            "classifier_path": a.classifier, "is_protocol": a.is_protocol, "prc_dtype": a.prc_dtype,
            "cache_dir": resolve_cache_dir(a.cache_dir), "batch_size": a.feature_batch_size,
            "feature_extractor": a.feature_extractor,
            "options": FeatureMetricOptions(kid_subsets=a.kid_subsets, kid_subset_size=a.kid_subset_size)}


def _metrics_list(a: argparse.Namespace) -> list[str]:
    import os

    from genaccel.eval.inception import WEIGHTS_ENV
    from genaccel.eval.metrics import parse_metrics

    if a.kid_subsets < 1 or a.kid_subset_size < 2:
        raise UsageError(f"--kid-subsets must be >= 1 and --kid-subset-size >= 2 (got {a.kid_subsets}, "
                         f"{a.kid_subset_size})")
    return parse_metrics(a.metrics, a.inception_weights or os.environ.get(WEIGHTS_ENV), a.reference,
                         a.feature_extractor, a.domain_reference)


def _metrics_for_model(metrics: list[str], num_classes: int, explicit: bool) -> list[str]:
    """Class accuracy only applies to models of the bundled crop classes: dropped under 'auto', an error if asked."""
    from genaccel.data.skimage_crops import NUM_CLASSES

    if "class_accuracy" not in metrics or num_classes == NUM_CLASSES:
        return metrics
    if explicit:
        raise ValueError(f"class_accuracy needs a model of the {NUM_CLASSES} bundled crop classes; this one has "
                         f"{num_classes} classes (drop class_accuracy from --metrics)")
    return [m for m in metrics if m != "class_accuracy"]


def run_sample(a: argparse.Namespace, argv: list[str]) -> dict | None:
    """The ``sample`` subcommand; returns the run record on rank 0 (None on other ranks)."""
    from genaccel.eval.job import init_distributed, release_job_lock, shutdown_distributed

    metrics = _metrics_list(a)  # validate before any sampling
    info = init_distributed()
    try:
        return _sample_and_score(a, argv, metrics, info)
    finally:
        release_job_lock(a.out)  # only if this process took it
        shutdown_distributed(info)


def _sample_and_score(a: argparse.Namespace, argv: list[str], metrics: list[str], info) -> dict | None:
    import time

    from genaccel.eval.images import open_images
    from genaccel.eval.job import (
        SAMPLES_FILE,
        SampleJob,
        barrier,
        pack_samples,
        prepare_job_dir,
        sample_shards,
        summarize_stats,
    )
    from genaccel.eval.metrics import compute_metrics, needs_inception, sharded_inception_features
    from genaccel.eval.throughput import environment, measure_latency
    from genaccel.samplers import build_sampler
    from genaccel.utils.io import save_json

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device, info.local_rank)
    options = sampler_options_given(a)
    sampler = build_sampler(a.sampler, **options)
    job = SampleJob(out_dir=a.out, num_images=a.num_images, batch_size=a.batch_size, seed=a.seed, labels=a.labels,
                    classes=a.classes, sampler=a.sampler, sampler_options=options, model=model_spec(a),
                    continuous_batching=a.continuous_batching)
    pipeline = load_pipeline(a, device)
    metrics = _metrics_for_model(metrics, pipeline.num_classes, explicit=a.metrics != "auto")
    prepare_job_dir(job, info)
    barrier(info)
    start = time.perf_counter()
    progress = sample_shards(pipeline, sampler, job, info, progress=not a.no_progress)
    barrier(info)
    wall = time.perf_counter() - start
    counts = _gather_counts(progress, info)
    if info.is_main:
        npz, labels, stats = pack_samples(job)  # streamed shard by shard; metrics read it back in batches
    barrier(info)
    generated = None
    if info.world > 1 and needs_inception(metrics, a.feature_extractor, a.inception_weights):  # each rank embeds a share
        generated = sharded_inception_features(Path(a.out) / SAMPLES_FILE, a.inception_weights, info, device,
                                               a.feature_batch_size)
    if not info.is_main:
        return None
    speed = {**summarize_stats(stats), "images_sampled_this_run": counts["images_sampled"],
             "processes": info.world, "sampling_wall_time_s": wall,
             "resumed_shards": counts["shards_resumed"]}
    if counts["images_sampled"] and not counts["shards_resumed"]:
        speed["images_per_s"] = counts["images_sampled"] / wall  # only when this run sampled everything
    if a.latency_repeats:
        lat = measure_latency(pipeline, sampler, repeats=a.latency_repeats)
        speed.update({k: lat[k] for k in ("latency_median_s", "latency_mean_s", "latency_min_s", "latencies_s")})
    run = {"schema": RUN_SCHEMA, "name": a.name or a.sampler, "created": _now(), "command": command_line(argv),
           "samples": stored_path(npz),
           "sampler": {"name": a.sampler, "options": _jsonable(sampler.options)}, "model": pipeline.info,
           "job": job.fingerprint(), "speed": speed,
           "metrics": compute_metrics(open_images(npz), labels, metrics, **_metric_kwargs(a), device=device,
                                      generated_inception=generated) if metrics else {},
           "environment": environment(device, DTYPES[a.dtype])}
    save_json(run, Path(a.out) / "run.json")
    return run


def _gather_counts(progress: dict, info) -> dict:
    """Sum the per-rank sampling counts onto every rank."""
    from genaccel.eval.job import sum_across_ranks

    keys = ("images_sampled", "shards_resumed", "shards_sampled")
    return {k: int(v) for k, v in sum_across_ranks({k: progress[k] for k in keys}, info).items()}


def _now() -> str:
    """UTC time of a run record (``genaccel report`` keeps the newest value when runs disagree)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _jsonable(options) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(options) if is_dataclass(options) else dict(options)


def run_metrics(a: argparse.Namespace) -> dict:
    from genaccel.eval.images import open_images
    from genaccel.eval.metrics import compute_metrics
    from genaccel.utils.io import save_json

    path = Path(a.samples)
    images = open_images(path)  # streamed in batches: 50k samples never sit in memory at once
    labels = None
    if path.suffix == ".npz":
        with np.load(path) as z:
            labels = z["arr_1"] if "arr_1" in z.files else None
    metrics = _metrics_list(a)
    if labels is None and "class_accuracy" in metrics:
        if a.metrics != "auto":
            raise ValueError(f"class_accuracy needs labels, but {path} has no 'arr_1'")
        metrics.remove("class_accuracy")
    out = compute_metrics(images, labels, metrics, **_metric_kwargs(a))
    if a.out:
        save_json(out, a.out)
    return out


def run_throughput(a: argparse.Namespace, argv: list[str]) -> dict:
    from genaccel.eval.throughput import environment, measure_latency, measure_throughput
    from genaccel.samplers import build_sampler
    from genaccel.utils.io import save_json

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    sampler = build_sampler(a.sampler, **sampler_options_given(a))
    pipeline = load_pipeline(a, device)
    decode = not a.no_decode
    lat = measure_latency(pipeline, sampler, warmup=a.warmup, repeats=a.repeats, include_decode=decode)
    thr = measure_throughput(pipeline, sampler, batch_size=a.batch_size, num_batches=a.num_batches,
                             warmup=a.warmup, include_decode=decode)
    speed = {"latency_median_s": lat["latency_median_s"], "latencies_s": lat["latencies_s"],
             "images_per_s": thr["images_per_s"], "throughput_batch_size": a.batch_size,
             "batch_times_s": thr["batch_times_s"], "nfe_per_image": lat["nfe_per_image"],
             "step_compression": lat["step_compression"], "include_decode": decode,
             **{k: v for k, v in thr.items() if k.startswith("peak_")}}
    run = {"schema": RUN_SCHEMA, "name": a.name or a.sampler, "created": _now(), "command": command_line(argv),
           "sampler": {"name": a.sampler, "options": _jsonable(sampler.options)}, "model": pipeline.info,
           "speed": speed, "metrics": {}, "environment": environment(device, DTYPES[a.dtype])}
    save_json(run, a.out)
    return run


def run_stats(a: argparse.Namespace) -> dict:
    """The ``stats`` subcommand: mu/sigma of an image set; Inception stats add ADM's mu_s/sigma_s (sFID), so the
    file is readable by the ADM evaluator's ``read_statistics``."""
    from genaccel.eval.fd import feature_stats, save_stats
    from genaccel.eval.images import open_images

    if a.images == "heldout":
        from genaccel.eval.fd import heldout_reference_images

        images = open_images(heldout_reference_images(a.per_class, seed=123).numpy())
    else:
        images = open_images(a.images)
    spatial = None
    if a.features == "domain":
        from genaccel.eval.feature_extractor import load_feature_extractor

        extractor = load_feature_extractor(a.classifier)
        feats = torch.cat([extractor.features(torch.from_numpy(np.ascontiguousarray(b)))
                           for b in images.batches(a.batch_size)])
    else:
        from genaccel.eval.inception import inception_features, load_inception

        out = inception_features(load_inception(a.inception_weights), images, a.batch_size)
        feats, spatial = out.pool, out.spatial.stats()
    stats = feature_stats(feats)
    save_stats(stats, a.out, spatial=spatial)
    return {"out": stored_path(a.out), "num": stats.num, "dim": stats.dim, "features": a.features,
            "keys": ["mu", "sigma"] + (["mu_s", "sigma_s"] if spatial is not None else []) + ["num"]}


def main(argv: list[str] | None = None) -> dict | None:
    """Entry point of ``genaccel eval``; bad input exits with one clear message (no traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(argv)
    try:
        if a.command == "sample":
            result = run_sample(a, argv)
        elif a.command == "metrics":
            result = run_metrics(a)
        elif a.command == "throughput":
            result = run_throughput(a, argv)
        else:
            result = run_stats(a)
    except (UsageError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"genaccel eval {a.command}: {e}") from e
    if result is not None:
        print(json.dumps(_summary(result), indent=2))
    return result


def _summary(result: dict) -> dict:
    """What to print: metrics and speed of a run record, or the whole (small) result."""
    if result.get("schema") == RUN_SCHEMA:
        return {"name": result["name"], "metrics": result["metrics"],
                "speed": {k: v for k, v in result["speed"].items() if not isinstance(v, list)}}
    return result


if __name__ == "__main__":
    sys.exit(run_command(main))
