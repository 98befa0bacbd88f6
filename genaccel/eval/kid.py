"""Kernel Inception Distance (Bińkowski et al. 2018) with torch-fidelity's protocol, in float64.

KID is the unbiased estimate of the squared MMD between two feature sets under the polynomial kernel
``k(x, y) = (gamma x.y + coef0) ** degree`` (degree 3, gamma 1/d, coef0 1), averaged over ``subsets`` random
subsets of ``subset_size`` features drawn without replacement from each side; the std over subsets is reported
too. The defaults and the random draws are torch-fidelity's (``kid_subsets=100``, ``kid_subset_size=1000``,
``rng_seed=2020``, one ``numpy.random.RandomState`` drawing the generated subset, then the real one, per subset),
so the subsets are the very ones torch-fidelity uses, with generated features as its ``input1``.

Difference from torch-fidelity: it evaluates the kernels in float32 numpy; we do it in float64 (on the features'
device), because KID is a small difference of large kernel sums. On the same features the two agree to float32
rounding (docs/eval.md gives the measured gap); our value is the closer one to the exact arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """``(gamma x @ y.T + coef0) ** degree`` with ``gamma = 1 / d`` when None (d = feature dimension)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² of m x m kernel blocks: the within-set means leave the diagonal (a point with itself) out,
    the cross term keeps every pair (torch-fidelity's and MMD-GAN's ``mmd_est='unbiased'``)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2.0 * k_xy.sum() / (m * m)


def kernel_distance(generated: torch.Tensor, real: torch.Tensor, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, degree: int = 3, gamma: float | None = None,
                    coef0: float = 1.0, seed: int = KID_SEED,
                    device: str | torch.device | None = None) -> dict[str, float]:
    """KID of ``generated`` against ``real`` features (N, d): ``{"mean", "std"}`` over the subsets.

    ``generated`` plays torch-fidelity's ``input1`` (its subset is drawn first). Raises ValueError naming the
    fix when a side has fewer than ``subset_size`` features or the dimensions differ. Memory: two subsets in
    float64 plus three ``subset_size``² kernels at a time, whatever N is."""
    generated, real = torch.as_tensor(generated), torch.as_tensor(real)
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"KID needs two (N, d) feature sets of one extractor, got {tuple(generated.shape)} and "
                         f"{tuple(real.shape)}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    n_gen, n_real = len(generated), len(real)
    if min(n_gen, n_real) < subset_size:
        raise ValueError(f"KID subsets of {subset_size} need at least {subset_size} features per side, got "
                         f"{n_gen} generated and {n_real} real: lower --kid-subset-size (at most "
                         f"{min(n_gen, n_real)}) or use more images")
    device = torch.device(device) if device is not None else generated.device
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return polynomial_kernel(a, b, degree, gamma, coef0)

    for i in range(subsets):
        gen_idx = torch.from_numpy(rng.choice(n_gen, subset_size, replace=False))
        real_idx = torch.from_numpy(rng.choice(n_real, subset_size, replace=False))
        x = generated[gen_idx].to(device, torch.float64)
        y = real[real_idx].to(device, torch.float64)
        values[i] = float(mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y)))
    return {"mean": float(values.mean()), "std": float(values.std())}


def kid_protocol(subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> str:
    """How a KID value was made, for run records."""
    return (f"torch-fidelity (polynomial kernel degree 3, gamma 1/d, coef0 1; unbiased MMD^2 over {subsets} "
            f"subsets of {subset_size}, seed {seed}; float64)")


__all__ = ["KID_SEED", "KID_SUBSETS", "KID_SUBSET_SIZE", "kernel_distance", "kid_protocol", "mmd2_unbiased",
           "polynomial_kernel"]
