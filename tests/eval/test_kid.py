"""KID: torch-fidelity's own function on the same features, and a float64 loop reference of the definition."""

import numpy as np
import pytest
import torch

from genaccel.eval.kid import kernel_distance


def _features(n: int, d: int, seed: int, shift: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Non-negative, correlated features (pool activations are post-ReLU), optionally shifted: samples of one
    distribution per (d, shift), drawn with ``seed``."""
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ mixing
    return (base.abs() / d**0.5 + shift).to(dtype)


def _kid_loops(x: np.ndarray, y: np.ndarray, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """KID from its definition, pair by pair in float64: k(a, b) = (a.b / d + 1)^3, unbiased MMD^2 per subset
    (within-set sums without i == j, cross sum over all pairs), subsets drawn as torch-fidelity draws them."""
    rng = np.random.RandomState(seed)
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    values = []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), size, replace=False)].astype(np.float64)
        ys = y[rng.choice(len(y), size, replace=False)].astype(np.float64)
        kxx = sum(k(xs[i], xs[j]) for i in range(size) for j in range(size) if i != j)
        kyy = sum(k(ys[i], ys[j]) for i in range(size) for j in range(size) if i != j)
        kxy = sum(k(xs[i], ys[j]) for i in range(size) for j in range(size))
        values.append((kxx + kyy) / (size * (size - 1)) - 2.0 * kxy / size**2)
    return float(np.mean(values)), float(np.std(values))


def test_kid_equals_a_float64_loop_reference():
    x, y = _features(40, 6, seed=1), _features(35, 6, seed=2, shift=0.3)
    ours = kernel_distance(x, y, subsets=4, subset_size=12, seed=7)
    mean, std = _kid_loops(x.numpy(), y.numpy(), 4, 12, 7)
    assert ours["mean"] == pytest.approx(mean, rel=1e-10)
    assert ours["std"] == pytest.approx(std, rel=1e-9)
    assert mean > 0.01  # the shifted set is clearly apart: the check is not about a value near zero


def test_kid_equals_torch_fidelity_on_the_same_features():
    from torch_fidelity.metric_kid import kid_features_to_metric

    gen, real = _features(300, 64, seed=3), _features(260, 64, seed=4, shift=0.05)
    ours = kernel_distance(gen, real, subsets=10, subset_size=200)  # torch-fidelity's default seed 2020
    kw = {"kid_subsets": 10, "kid_subset_size": 200, "verbose": False}
    # float64 features: torch-fidelity then computes in float64 too, so only summation order differs
    theirs64 = kid_features_to_metric(gen.double(), real.double(), **kw)
    assert ours["mean"] == pytest.approx(theirs64["kernel_inception_distance_mean"], rel=1e-9)
    assert ours["std"] == pytest.approx(theirs64["kernel_inception_distance_std"], rel=1e-9)
    # float32 features (what extractors give): torch-fidelity's kernels are float32, ours float64
    theirs32 = kid_features_to_metric(gen, real, **kw)
    assert ours["mean"] == pytest.approx(theirs32["kernel_inception_distance_mean"], rel=1e-3)
    # a different seed draws other subsets: the value moves, so the seed handling above is what matched
    other = kernel_distance(gen, real, subsets=10, subset_size=200, seed=2021)
    assert other["mean"] != pytest.approx(ours["mean"], rel=1e-6)


def test_kid_separates_distributions_and_is_near_zero_for_the_same_one():
    a, b = _features(400, 16, seed=5), _features(400, 16, seed=6)
    same = kernel_distance(a, b, subsets=20, subset_size=200)
    apart = kernel_distance(a, _features(400, 16, seed=6, shift=0.2), subsets=20, subset_size=200)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-6
    assert apart["mean"] > 10 * abs(same["mean"]) and apart["mean"] > apart["std"]


def test_kid_errors_name_the_fix():
    a = torch.rand(50, 4)
    with pytest.raises(ValueError, match="lower --kid-subset-size"):
        kernel_distance(a, torch.rand(30, 4), subset_size=40)
    with pytest.raises(ValueError, match="same|one extractor"):
        kernel_distance(a, torch.rand(50, 5), subset_size=10)
