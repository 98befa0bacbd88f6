"""Cost of each feature-space metric on N features, and KID's agreement with torch-fidelity's own function.

``python -m genaccel.eval.metric_cost --num-generated 5000 --num-real 5000 --dim 2048`` times FD, KID (ours,
float64, and torch-fidelity's ``kid_features_to_metric``, float32, on the very same features), precision/recall
(ADM, k=3) and density/coverage (k=5) on random non-negative correlated features of Inception's width, and
prints one JSON object: seconds per metric, the values, and the relative KID gap. Feature extraction is not
included (it dominates a real run: ~7 images/s for Inception on 2 CPU cores, docs/eval.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def synthetic_features(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Non-negative correlated float32 features (as post-ReLU pool activations); one distribution per shift."""
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)) / dim**0.5
    base = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) @ mixing
    return base.abs() + shift


def measure(num_generated: int, num_real: int, dim: int, kid_subsets: int, kid_subset_size: int,
            device: str = "cpu") -> dict:
    """Seconds and values of every feature metric on one synthetic generated/real pair."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    from genaccel.eval.density_coverage import density_coverage
    from genaccel.eval.fd import fd_from_stats, feature_stats
    from genaccel.eval.inception import precision_recall
    from genaccel.eval.kid import kernel_distance

    gen = synthetic_features(num_generated, dim, seed=1, shift=0.02)
    real = synthetic_features(num_real, dim, seed=2)
    out: dict = {"num_generated": num_generated, "num_real": num_real, "dim": dim, "device": device,
                 "threads": torch.get_num_threads(), "seconds": {}, "values": {}}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        out["seconds"][name] = round(time.perf_counter() - start, 2)
        return value

    out["values"]["fd"] = timed("fd", lambda: fd_from_stats(feature_stats(gen), feature_stats(real)))
    ours = timed("kid", lambda: kernel_distance(gen, real, kid_subsets, kid_subset_size, device=device))
    theirs = timed("kid_torch_fidelity", lambda: kid_features_to_metric(
        gen, real, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, verbose=False))
    out["values"].update(kid_mean=ours["mean"], kid_std=ours["std"],
                         kid_mean_torch_fidelity=theirs["kernel_inception_distance_mean"],
                         kid_relative_gap=abs(ours["mean"] / theirs["kernel_inception_distance_mean"] - 1))
    out["values"].update(timed("prc", lambda: precision_recall(gen, real, device=device)))
    out["values"].update(timed("dc", lambda: density_coverage(gen, real, device=device)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m genaccel.eval.metric_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-generated", type=int, default=5000)
    p.add_argument("--num-real", type=int, default=5000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = measure(a.num_generated, a.num_real, a.dim, a.kid_subsets, a.kid_subset_size, a.device)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
