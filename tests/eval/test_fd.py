import numpy as np
import pytest
import torch

from genaccel.eval.fd import feature_stats, frechet_distance, load_stats, save_stats


def _features(seed: int, n: int = 200, d: int = 16, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift


def test_fd_matches_torch_fidelity_on_the_same_features():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    a, b = _features(0), _features(1, shift=0.5)
    sa, sb = feature_stats(a), feature_stats(b)
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    ta = fid_features_to_statistics(torch.from_numpy(a))
    tb = fid_features_to_statistics(torch.from_numpy(b))
    theirs = fid_statistics_to_metric(ta, tb, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert ours > 1.0


def test_fd_is_zero_for_identical_and_mean_shift_for_equal_covariances():
    s = feature_stats(_features(0))
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8
    shift = np.full_like(s.mu, 0.25)
    assert frechet_distance(s.mu, s.sigma, s.mu + shift, s.sigma) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fd_rejects_mismatched_dimensions():
    a, b = feature_stats(_features(0, d=8)), feature_stats(_features(1, d=16))
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def test_feature_stats_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 4)))


def test_stats_roundtrip_and_wrong_keys(tmp_path):
    s = feature_stats(_features(2))
    back = load_stats(save_stats(s, tmp_path / "ref.npz"), dim=16)
    np.testing.assert_allclose(back.sigma, s.sigma)
    np.savez(tmp_path / "bad.npz", mean=s.mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="16-d statistics"):
        load_stats(tmp_path / "ref.npz", dim=128)


def test_feature_stats_beyond_one_chunk_equal_np_cov(monkeypatch):
    from genaccel.eval import fd

    monkeypatch.setattr(fd, "STATS_CHUNK", 64)
    f = _features(3, n=300, d=8) + 50.0
    s = feature_stats(f.astype(np.float32))
    np.testing.assert_allclose(s.mu, f.astype(np.float32).astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(f.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-9)
    assert s.num == 300
