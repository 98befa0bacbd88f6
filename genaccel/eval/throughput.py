"""Speed measurements shared by ``genaccel eval`` and the benchmarks.

Conventions (eval.md §5): latency is per image at batch size 1, median of ``repeats`` timed calls after
``warmup`` untimed ones, with the device synchronised around each call and model loading excluded;
throughput is images/s at a given batch size (CFG doubling happens inside the sampler and is included).
Both say whether VQ decoding is included. NFE counts target-model forwards per image sequence (CFG
halves share one forward); step compression = image tokens / NFE (1.0 for plain AR). The environment
(torch version, device, dtype, threads) goes with every number.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict
from typing import Any

import torch

from genaccel.samplers.base import Sampler, SamplerStats
from genaccel.utils.dtypes import dtype_name


def _parts(pipeline_or_model) -> tuple[Any, Any]:
    """(ARModel, pipeline or None): accepts an ImagePipeline or a bare model implementing the contract."""
    gpt = getattr(pipeline_or_model, "gpt", None)
    return (gpt, pipeline_or_model) if gpt is not None else (pipeline_or_model, None)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (a high-water mark
    over the whole process, including model loading — not a per-call figure)."""
    if device.type == "cuda":
        return {"peak_cuda_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def environment(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What a speed number depends on: versions, device, dtype, threads, and the machine's load at the time."""
    device = torch.device(device or "cpu")
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "dtype": dtype_name(dtype) if dtype else None,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu": platform.processor() or platform.machine(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "load_avg_1m": os.getloadavg()[0],  # other work on a shared machine skews timings
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _run_once(model, pipeline, sampler: Sampler, labels: torch.Tensor, seed: int, decode: bool) -> SamplerStats:
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sampler.generate(model, labels.to(device), gen)
    if decode and pipeline is not None:
        pipeline.decode(out.tokens)
    return out.stats


def _timed_calls(pipeline_or_model, sampler: Sampler, batch_size: int, warmup: int, repeats: int,
                 seed: int, include_decode: bool, label: int | None) -> tuple[list[float], list[SamplerStats], dict]:
    model, pipeline = _parts(pipeline_or_model)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = model_device(model)
    num_classes = model.num_classes
    times, stats = [], []
    for i in range(warmup + repeats):
        labels = torch.full((batch_size,), label, dtype=torch.long) if label is not None else \
            torch.arange(i * batch_size, (i + 1) * batch_size) % num_classes
        if i == warmup:
            reset_peak_memory(device)
        synchronize(device)
        start = time.perf_counter()
        s = _run_once(model, pipeline, sampler, labels, seed + i, include_decode)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            stats.append(s)
    info = {"batch_size": batch_size, "warmup": warmup, "repeats": repeats, "include_decode":
            include_decode and pipeline is not None, "sampler": sampler.name, "sampler_options": asdict(sampler.options),
            **peak_memory(device), "environment": environment(device, next(model.parameters()).dtype)}
    return times, stats, info


def _nfe_summary(stats: list[SamplerStats]) -> dict[str, float]:
    nfe = statistics.mean(s.nfe for s in stats)
    tokens = statistics.mean(s.tokens for s in stats)
    return {"nfe_per_image": nfe, "tokens_per_image": tokens, "step_compression": tokens / max(nfe, 1e-12)}


def measure_latency(pipeline_or_model, sampler: Sampler, warmup: int = 1, repeats: int = 5, seed: int = 0,
                    include_decode: bool = True, label: int | None = None) -> dict[str, Any]:
    """Per-image latency at batch size 1: median/mean/min/max seconds over ``repeats`` after ``warmup``."""
    times, stats, info = _timed_calls(pipeline_or_model, sampler, 1, warmup, repeats, seed, include_decode, label)
    return {"latency_median_s": statistics.median(times), "latency_mean_s": statistics.mean(times),
            "latency_min_s": min(times), "latency_max_s": max(times), "latencies_s": times,
            **_nfe_summary(stats), **info}


def measure_throughput(pipeline_or_model, sampler: Sampler, batch_size: int = 16, num_batches: int = 3,
                       warmup: int = 1, seed: int = 0, include_decode: bool = True) -> dict[str, Any]:
    """Images/s at ``batch_size``: images over total time of ``num_batches`` timed batches (after warm-up)."""
    times, stats, info = _timed_calls(pipeline_or_model, sampler, batch_size, warmup, num_batches, seed,
                                      include_decode, None)
    total = sum(times)
    return {"images_per_s": batch_size * num_batches / total, "seconds_per_batch_median": statistics.median(times),
            "batch_times_s": times, **_nfe_summary(stats), **info}


__all__ = ["environment", "measure_latency", "measure_throughput", "peak_memory", "reset_peak_memory", "synchronize"]
