"""Fréchet distance in float64, FD-domain, and class accuracy of generated samples.

``frechet_distance`` is the TTUR / torch-fidelity formula
``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`` with the trace of the matrix square root taken
from the eigenvalues of ``S1 @ S2`` (as torch-fidelity does; exact for PSD inputs, no ``sqrtm``
iteration that can fail). **FD-domain** is that distance on the penultimate features of the bundled crop
classifier: label it FD-domain, never FID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of N feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


STATS_CHUNK = 8192  # rows converted to float64 at a time: 50k x 2048 features never exist in float64 at once


def feature_stats(features: torch.Tensor | np.ndarray) -> FeatureStats:
    """Float64 mean and unbiased covariance of features (N, D); needs N >= 2.

    Up to ``STATS_CHUNK`` rows this is ``np.cov``; beyond, rows are folded in by :class:`RunningStats` chunk by
    chunk (equal to float64 rounding), so the float64 copy of 50k x 2048 features (0.8 GB, 1.6 GB with np.cov's
    centred copy) is never made."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if f.shape[0] > STATS_CHUNK:
        running = RunningStats()
        for i in range(0, f.shape[0], STATS_CHUNK):
            running.update(f[i:i + STATS_CHUNK])
        return running.stats()
    f = f.astype(np.float64)
    return FeatureStats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), num=f.shape[0])


class RunningStats:
    """Mean and covariance of feature batches seen one at a time, in float64, without keeping the features.

    Batches are merged with Chan et al.'s pairwise update (centred scatter per batch), so the result equals
    ``feature_stats`` of the concatenation up to float64 rounding, and memory stays at D x D however many
    images stream through (50k Inception spatial features would otherwise take 400 MB). Two instances built
    on different shards combine with :meth:`merge`."""

    def __init__(self) -> None:
        self.num = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch (B, D) of feature vectors."""
        f = np.asarray(features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        if len(f):
            centred = f - f.mean(axis=0)
            self._combine(len(f), f.mean(axis=0), centred.T @ centred)

    def merge(self, other: RunningStats) -> None:
        """Fold in the statistics of another stream (e.g. another rank's shard)."""
        if other.num:
            self._combine(other.num, other.mean, other.scatter)

    def _combine(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if self.num == 0:
            self.num, self.mean, self.scatter = n, mean.copy(), scatter.copy()
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"feature dimension changed from {self.mean.shape[0]} to {mean.shape[0]}")
        total = self.num + n
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.num * n / total)
        self.mean += delta * (n / total)
        self.num = total

    def stats(self) -> FeatureStats:
        """Mean and unbiased covariance (as ``np.cov``); needs at least 2 vectors."""
        if self.num < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.num}")
        return FeatureStats(mu=self.mean.copy(), sigma=self.scatter / (self.num - 1), num=self.num)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(both sides must come from the same feature extractor)"
        )
    diff = mu1 - mu2
    # Complex sqrt of the eigenvalues, real part summed: tiny negative / complex round-off terms drop out.
    tr_covmean = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fd_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fd_domain(images_a: torch.Tensor, images_b: torch.Tensor, extractor=None, batch_size: int = 256) -> float:
    """FD-domain between two image sets (uint8 NHWC or float NCHW in [-1, 1]) with the bundled classifier."""
    from genaccel.eval.feature_extractor import load_feature_extractor

    extractor = extractor or load_feature_extractor()
    fa = extractor.features(images_a, batch_size)
    fb = extractor.features(images_b, batch_size)
    return fd_from_stats(feature_stats(fa), feature_stats(fb))


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, extractor=None, batch_size: int = 256) -> float:
    """Fraction of images the crop classifier assigns to the class they were sampled for."""
    from genaccel.eval.feature_extractor import load_feature_extractor

    labels = torch.as_tensor(labels).long().cpu()
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels: pass one requested label per image")
    extractor = extractor or load_feature_extractor()
    return float((extractor.predict(images, batch_size) == labels).float().mean())


def quantize_like_samples(images: torch.Tensor) -> torch.Tensor:
    """Float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) with the pipeline's ``clamp(127.5 x + 128)`` mapping,
    so real reference crops and decoded samples reach the feature extractor through the same uint8 path."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def heldout_reference_images(per_class: int = 64, seed: int = 123, size: int = 64) -> torch.Tensor:
    """The default FD-domain reference set: class-balanced held-out crops, quantised to uint8 NHWC.

    ``size`` matches the generated images (128 for the 128x128 Token-Shuffle model): both sides then reach
    the 64x64 classifier through the same antialiased resize (``feature_extractor.to_model_input``)."""
    from genaccel.data.skimage_crops import make_crops

    images, _ = make_crops("heldout", per_class, seed=seed, size=size)
    return quantize_like_samples(images)


def reference_domain_stats(per_class: int = 64, seed: int = 123, extractor=None, size: int = 64) -> FeatureStats:
    """FD-domain reference statistics: held-out crops of the bundled dataset (class-balanced, fixed seed)."""
    from genaccel.eval.feature_extractor import load_feature_extractor

    extractor = extractor or load_feature_extractor()
    return feature_stats(extractor.features(heldout_reference_images(per_class, seed, size)))


def save_stats(stats: FeatureStats, path: str | os.PathLike, spatial: FeatureStats | None = None) -> Path:
    """Write ``mu``/``sigma`` (and ``mu_s``/``sigma_s`` when ``spatial`` is given) as an ``.npz``, atomically.

    The keys are the TTUR / clean-fid / ADM reference convention; with the spatial pair the file is what ADM's
    ``read_statistics`` expects (it reads all four keys once ``mu`` is present), so the ADM evaluator can use
    our Inception reference statistics for FID and sFID."""
    from genaccel.utils.io import atomic_write

    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num": np.int64(stats.num)}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def load_stats(path: str | os.PathLike, dim: int | None = None, spatial: bool = False) -> FeatureStats:
    """Read ``mu``/``sigma`` (``mu_s``/``sigma_s`` with ``spatial``, the sFID pair) from an ``.npz``; raises
    naming the missing keys or a dimension mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    keys = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
    with np.load(path) as z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            what = "sFID needs the spatial statistics 'mu_s' and 'sigma_s'" if spatial else \
                "a reference .npz needs 'mu' and 'sigma'"
            raise ValueError(f"{path} lacks key(s) {missing} (has {z.files}); {what}")
        mu, sigma = z[keys[0]].astype(np.float64), z[keys[1]].astype(np.float64)
        num = int(z["num"]) if "num" in z.files else 0
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: sigma {sigma.shape} does not match mu {mu.shape}")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{path} holds {mu.shape[0]}-d statistics but the feature extractor gives {dim}-d features")
    return FeatureStats(mu=mu, sigma=sigma, num=num)


__all__ = ["FeatureStats", "RunningStats", "class_accuracy", "heldout_reference_images", "quantize_like_samples", "fd_domain", "fd_from_stats", "feature_stats", "frechet_distance",
           "load_stats", "reference_domain_stats", "save_stats"]
