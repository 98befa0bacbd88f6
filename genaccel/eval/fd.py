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


def feature_stats(features: torch.Tensor | np.ndarray) -> FeatureStats:
    """Float64 mean and unbiased covariance of features (N, D); needs N >= 2."""
    f = np.asarray(features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return FeatureStats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), num=f.shape[0])


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


def save_stats(stats: FeatureStats, path: str | os.PathLike) -> Path:
    """Write ``mu``/``sigma`` as an ``.npz`` (TTUR / clean-fid / ADM reference convention), atomically."""
    from genaccel.utils.io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num))

    return atomic_write(path, write)


def load_stats(path: str | os.PathLike, dim: int | None = None) -> FeatureStats:
    """Read ``mu``/``sigma`` from an ``.npz``; raises naming the missing keys or a dimension mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks key(s) {missing} (has {z.files}); a reference .npz needs 'mu' and 'sigma'")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        num = int(z["num"]) if "num" in z.files else 0
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: sigma {sigma.shape} does not match mu {mu.shape}")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{path} holds {mu.shape[0]}-d statistics but the feature extractor gives {dim}-d features")
    return FeatureStats(mu=mu, sigma=sigma, num=num)


__all__ = ["FeatureStats", "class_accuracy", "heldout_reference_images", "quantize_like_samples", "fd_domain", "fd_from_stats", "feature_stats", "frechet_distance",
           "load_stats", "reference_domain_stats", "save_stats"]
