"""Density / coverage against a float64 loop reference of Naeem et al.'s definitions, and the F-score."""

import numpy as np
import pytest
import torch

from genaccel.eval.density_coverage import density_coverage, f_score


def _loops(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020, Eq. 3-4, one pair at a time in float64 with Euclidean (not squared) distances:
    radius_i = distance from real i to its k-th nearest other real point;
    density = 1/(k M) sum_j sum_i [d(fake_j, real_i) < radius_i]; coverage = 1/N sum_i [min_j d(fake_j, real_i) < radius_i]."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    radii = []
    for i in range(len(real)):
        others = sorted(float(np.linalg.norm(real[i] - real[j])) for j in range(len(real)) if j != i)
        radii.append(others[k - 1])
    hits = 0
    for f in fake:
        hits += sum(float(np.linalg.norm(f - real[i])) < radii[i] for i in range(len(real)))
    covered = sum(min(float(np.linalg.norm(f - real[i])) for f in fake) < radii[i] for i in range(len(real)))
    return {"density": hits / (k * len(fake)), "coverage": covered / len(real)}


@pytest.mark.parametrize("block", [16, 10000])  # tiles smaller than either set, and one tile
def test_density_coverage_equal_the_loop_reference(block):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(70, 12, generator=g)
    fake = 0.8 * torch.randn(90, 12, generator=g) + 0.3  # narrower and shifted: density and coverage < 1
    ours = density_coverage(fake, real, k=5, block=block)
    ref = _loops(real.numpy(), fake.numpy(), 5)
    assert ours["density"] == pytest.approx(ref["density"], abs=1e-12)
    assert ours["coverage"] == pytest.approx(ref["coverage"], abs=1e-12)
    assert 0.1 < ref["coverage"] < 0.99 and ref["density"] > 0.1  # a case where both can be wrong


def test_generated_outliers_leave_coverage_and_only_dilute_density():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(60, 8, generator=g), torch.randn(50, 8, generator=g)
    base = density_coverage(fake, real)
    with_outliers = density_coverage(torch.cat([fake, 100 + torch.randn(10, 8, generator=g)]), real)
    assert with_outliers["coverage"] == base["coverage"]
    assert with_outliers["density"] == pytest.approx(base["density"] * 50 / 60, rel=1e-12)


def test_density_coverage_errors():
    with pytest.raises(ValueError, match="more than 5 real"):
        density_coverage(torch.rand(10, 3), torch.rand(5, 3))
    with pytest.raises(ValueError, match="one extractor"):
        density_coverage(torch.rand(10, 3), torch.rand(10, 4))


def test_f_score_is_torch_fidelitys_f1():
    assert f_score(0.6, 0.3) == pytest.approx(2 * 0.18 / 0.9)
    assert f_score(0.0, 0.0) == 0.0
    assert f_score(1.0, 1.0) == pytest.approx(1.0)
