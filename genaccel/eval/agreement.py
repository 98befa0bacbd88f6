"""How closely our FID / IS / P&R agree with the ADM evaluator's formulas and torch-fidelity on the same features.

``python -m genaccel.eval.agreement`` draws correlated random features of Inception's dimensions (pool 2048,
logits 1008), computes every metric our way and the reference ways (the ADM evaluator's numpy/scipy formulas
re-implemented here from openai/guided-diffusion ``evaluations/evaluator.py``: ``scipy.linalg.sqrtm`` FID,
float32 softmax IS in consecutive splits of 5000, full-matrix P&R; and torch-fidelity's own functions), and
prints the relative differences that docs/eval.md quotes. Same features in, so only the arithmetic differs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def _features(rng: np.random.Generator, n: int, d: int, shift: float, latent: int = 64,
              noise: float = 0.3) -> np.ndarray:
    """Non-negative features near a ``latent``-dimensional linear manifold, plus isotropic noise."""
    mix = np.random.default_rng(12345).normal(size=(latent, d)) / 8  # the same manifold for every call
    return np.abs(rng.normal(size=(n, latent)) @ mix + rng.normal(size=(n, d)) * noise + shift).astype(np.float32)


def adm_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The ADM evaluator's FIDStatistics.frechet_distance (TTUR): np.cov statistics, scipy sqrtm."""
    from scipy import linalg

    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2)).real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def adm_is(logits: np.ndarray, split_size: int = 5000) -> float:
    """The ADM evaluator's compute_inception_score, float32 softmax as its TF graph."""
    x = logits.astype(np.float32)
    e = np.exp(x - x.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_prc(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The ADM evaluator's P&R with one block (full matrices, float64 here)."""
    def sq(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0.0)

    ref, sample = ref.astype(np.float64), sample.astype(np.float64)
    r_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
    r_sample = np.partition(sq(sample, sample), k, axis=1)[:, k]
    d = sq(ref, sample)
    return float(np.mean(np.any(d <= r_ref[:, None], axis=0))), float(np.mean(np.any(d <= r_sample[None, :], axis=1)))


def measure(n_fid: int = 5000, n_prc: int = 3000, seed: int = 0) -> dict[str, float]:
    """Relative / absolute differences per metric (see the module docstring)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from genaccel.eval.fd import fd_from_stats, feature_stats
    from genaccel.eval.inception import inception_score, precision_recall

    rng = np.random.default_rng(seed)
    gen, ref = _features(rng, n_fid, 2048, 0.0), _features(rng, n_fid, 2048, 0.05)
    ours = fd_from_stats(feature_stats(gen), feature_stats(ref))
    adm = adm_fid(gen, ref)
    tf = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(gen)),
                                  fid_features_to_statistics(torch.from_numpy(ref)), verbose=False)
    logits = (rng.normal(size=(12000, 1008)) * 2).astype(np.float32)
    is_ours = inception_score(torch.from_numpy(logits), "adm")["inception_score_mean"]
    # one 32-d manifold, little noise: P&R mid-range (pure noise in 2048-d puts both near 0)
    pg, pr = (_features(rng, n_prc, 2048, 0.0, latent=32, noise=0.01) for _ in range(2))
    prc32 = precision_recall(torch.from_numpy(pg), torch.from_numpy(pr))
    prc16 = precision_recall(torch.from_numpy(pg), torch.from_numpy(pr), dtype=torch.float16)
    p_adm, r_adm = adm_prc(pr, pg)
    return {
        "fid": ours,
        "fid_rel_vs_adm_sqrtm": abs(ours - adm) / adm,
        "fid_rel_vs_torch_fidelity": abs(ours - tf["frechet_inception_distance"]) / adm,
        "is_adm": is_ours,
        "is_rel_vs_adm_float32": abs(is_ours - adm_is(logits)) / is_ours,
        "precision": prc32["precision"], "recall": prc32["recall"],
        "prc_fp32_abs_vs_adm_full_matrix": max(abs(prc32["precision"] - p_adm), abs(prc32["recall"] - r_adm)),
        "prc_fp16_abs_vs_fp32": max(abs(prc16["precision"] - prc32["precision"]),
                                    abs(prc16["recall"] - prc32["recall"])),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Entry point of ``python -m genaccel.eval.agreement``."""
    p = argparse.ArgumentParser(prog="python -m genaccel.eval.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--n-fid", type=int, default=5000, help="features per side for FID")
    p.add_argument("--n-prc", type=int, default=3000, help="features per side for P&R")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = measure(a.n_fid, a.n_prc, a.seed)
    for k, v in out.items():
        print(f"{k:<36} {v:.3e}")
    return out


if __name__ == "__main__":
    main()
