"""ADM-evaluator parity: every Inception metric against a reference implementation written here from the
definitions in openai/guided-diffusion ``evaluations/evaluator.py`` (numpy/scipy, full matrices), on the same
features. The Inception network is random (conftest), so only agreement is tested, not values."""

import numpy as np
import pytest
import torch
from eval_helpers import cli_metrics_run, noisy_images
from scipy import linalg

from genaccel.eval.__main__ import main
from genaccel.eval.fd import RunningStats, feature_stats
from genaccel.eval.images import save_adm_npz
from genaccel.eval.inception import inception_score, load_inception, manifold_radii, precision_recall


# ---- reference implementation (ADM evaluator's definitions) -------------------------------------------------
def adm_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FIDStatistics.frechet_distance on np.mean / np.cov statistics (scipy sqrtm)."""
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """compute_inception_score: softmax, consecutive splits, exp of the mean KL, mean over splits."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_prec_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ManifoldEstimator with one block: squared distances, radius = k-th entry of the sorted row (self at 0)."""
    def sq(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0.0)

    r_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
    r_sample = np.partition(sq(sample, sample), k, axis=1)[:, k]
    d = sq(ref, sample)
    recall = np.mean(np.any(d <= r_sample[None, :], axis=1))
    precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
    return float(precision), float(recall)


def adm_read_statistics(path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Evaluator.read_statistics for a file with 'mu': it reads mu, sigma, mu_s, sigma_s (KeyError otherwise)."""
    obj = np.load(path)
    assert "mu" in list(obj.keys())
    return (obj["mu"], obj["sigma"]), (obj["mu_s"], obj["sigma_s"])


def adm_features(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool, unbiased logits and spatial features computed here: mixed_6/conv = Mixed_6d.branch1x1, [..., :7] of
    the NHWC tensor, flattened per image (ADM's compute_activations)."""
    grabbed = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.append(o.detach().clone()))
    with torch.no_grad():
        pool, logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    hook.remove()
    spatial = grabbed[0].permute(0, 2, 3, 1).numpy()[..., :7].reshape(len(images), -1)
    return pool.double().numpy(), logits.double().numpy(), spatial.astype(np.float64)


def common_subspace(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` in an orthonormal basis of the span of their centred rows and mean difference.

    Means, covariances' traces and the nonzero eigenvalues of ``S1 S2`` are unchanged by this change of basis,
    so ``adm_fid`` gives the same value on the projected features (checked in
    ``test_fid_is_unchanged_in_the_common_subspace``) while scipy's ``sqrtm`` runs on a (n1 + n2)-square matrix
    instead of a 2048-square one (tens of seconds on one CPU thread)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    q, _ = np.linalg.qr(np.concatenate([a - mu_a, b - mu_b, (mu_a - mu_b)[None]]).T)
    return a @ q, b @ q


# ---- helpers ----------------------------------------------------------------------------------------------
def _features(seed: int, n: int, d: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=d)).astype(np.float32)


# ---- metric functions on given features -------------------------------------------------------------------
def test_is_adm_protocol_is_in_order_splits_of_5000():
    logits = torch.from_numpy(np.random.default_rng(0).normal(size=(12000, 50)) * 3)
    ours = inception_score(logits, "adm")
    assert ours["inception_score_mean"] == pytest.approx(adm_inception_score(logits.numpy()), rel=1e-10)
    assert ours["inception_score_protocol"] == "adm (in-order splits of 5000)"
    # order matters for ADM (the splits are consecutive), and the last split is the 2000 left over
    perm = logits[torch.randperm(12000, generator=torch.Generator().manual_seed(1))]
    assert inception_score(perm, "adm")["inception_score_mean"] == pytest.approx(
        adm_inception_score(perm.numpy()), rel=1e-10)
    from torch_fidelity.metric_isc import isc_features_to_metric

    tf = inception_score(logits, "torch-fidelity")
    assert tf["inception_score_mean"] == isc_features_to_metric(logits, splits=10)["inception_score_mean"]


@pytest.mark.parametrize("block", [10000, 97])
def test_precision_recall_equals_adm_full_matrix(block):
    gen, ref = _features(0, 700), _features(1, 500)
    ours = precision_recall(torch.from_numpy(gen), torch.from_numpy(ref), k=3, block=block)
    p, r = adm_prec_recall(ref.astype(np.float64), gen.astype(np.float64))
    assert (ours["precision"], ours["recall"]) == (p, r)
    assert 0.0 < p < 1.0 and 0.0 < r < 1.0  # a case where both can be wrong


def test_manifold_radii_tiled_equals_one_block():
    f = torch.from_numpy(_features(2, 333))
    np.testing.assert_allclose(manifold_radii(f, 3, block=50), manifold_radii(f, 3, block=10000), rtol=1e-5)


def test_prc_fp16_follows_adm_with_fp32_fallback():
    gen, ref = torch.from_numpy(_features(3, 400)), torch.from_numpy(_features(4, 300))
    fp32 = precision_recall(gen, ref)
    fp16 = precision_recall(gen, ref, dtype=torch.float16)
    assert fp16["precision"] == pytest.approx(fp32["precision"], abs=0.03)
    assert fp16["recall"] == pytest.approx(fp32["recall"], abs=0.03)
    # squared norms above 65504 overflow float16: every block falls back to float32 (ADM's tf.cond)
    big = precision_recall(gen * 400, ref * 400, dtype=torch.float16)
    assert big == precision_recall(gen * 400, ref * 400)


def test_running_stats_equal_np_cov_in_any_batching():
    f = _features(5, 257).astype(np.float64) + 100.0  # a large mean: naive sum-of-squares would lose digits
    rs, other = RunningStats(), RunningStats()
    for chunk in np.array_split(f[:200], 7):
        rs.update(chunk)
    other.update(f[200:])
    rs.merge(other)
    np.testing.assert_allclose(rs.stats().mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rs.stats().sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)


# ---- end to end through the CLI, same model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def adm_run(tmp_path_factory, random_inception):
    """Generated and real image files, the CLI's fid/sfid/is/prc on them against the real images, and the pool,
    logits and spatial features computed here (``adm_features``): computed once, shared by the tests below.
    Six and five images: every equality holds for any set size, P&R's k=3 needs at least 4 per set."""
    run = cli_metrics_run(tmp_path_factory.mktemp("adm_parity"), "fid,sfid,is,prc", random_inception)
    model = load_inception(random_inception)
    return {**run, "gen_features": adm_features(model, run["gen"]), "real_features": adm_features(model, run["real"])}


def test_fid_is_unchanged_in_the_common_subspace():
    a, b = _features(8, 7, d=64), _features(9, 5, d=64) + 0.3
    assert adm_fid(*common_subspace(a, b)) == pytest.approx(adm_fid(a, b), rel=1e-6)  # sqrtm noise: ~1e-8


def test_cli_metrics_equal_adm_reference_implementation(adm_run):
    ours = adm_run["ours"]
    g_pool, g_logits, g_spatial = adm_run["gen_features"]
    r_pool, _, r_spatial = adm_run["real_features"]
    assert g_spatial.shape == (6, 17 * 17 * 7)
    assert ours["fid"] == pytest.approx(adm_fid(*common_subspace(g_pool, r_pool)), rel=1e-6)
    assert ours["sfid"] == pytest.approx(adm_fid(*common_subspace(g_spatial, r_spatial)), rel=1e-6)
    assert ours["sfid"] > 0 and ours["fid"] > 0
    assert ours["inception_score_mean"] == pytest.approx(adm_inception_score(g_logits), rel=1e-6)
    assert (ours["precision"], ours["recall"]) == adm_prec_recall(r_pool.astype(np.float32).astype(np.float64),
                                                                  g_pool.astype(np.float32).astype(np.float64))


def test_inception_stats_file_is_read_by_adm_and_gives_the_same_fid_sfid(tmp_path, random_inception, adm_run):
    folder, real = adm_run["folder"], adm_run["real"]
    w = ["--inception-weights", str(random_inception)]
    main(["stats", str(folder / "real.npz"), "--features", "inception", "--out", str(tmp_path / "ref.npz"), *w,
          "--batch-size", "2"])
    (mu, sigma), (mu_s, sigma_s) = adm_read_statistics(tmp_path / "ref.npz")
    r_pool, _, r_spatial = adm_run["real_features"]
    np.testing.assert_allclose(mu, r_pool.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mu_s, r_spatial.mean(0), rtol=1e-5, atol=1e-7)  # NHWC order, as ADM's mu_s
    np.testing.assert_allclose(sigma_s, np.cov(r_spatial, rowvar=False), rtol=1e-4, atol=1e-7)
    assert mu_s.shape == (2023,) and sigma.shape == (2048, 2048) and len(real) == 5
    from_stats = main(["metrics", str(folder / "gen.npz"), "--metrics", "fid,sfid", *w, "--reference",
                       str(tmp_path / "ref.npz")])
    from_images = adm_run["ours"]  # the same generated images against the reference's images
    assert from_stats["reference_stats_from"] == "file"
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-6)
    assert from_stats["sfid"] == pytest.approx(from_images["sfid"], rel=1e-6)


def test_sfid_needs_spatial_statistics_or_images(tmp_path, random_inception):
    save_adm_npz(tmp_path / "gen.npz", noisy_images(0, n=4))
    s = feature_stats(np.random.default_rng(0).normal(size=(10, 2048)))
    np.savez(tmp_path / "ttur.npz", mu=s.mu, sigma=s.sigma)  # TTUR / clean-fid layout: no mu_s
    args = ["metrics", str(tmp_path / "gen.npz"), "--inception-weights", str(random_inception), "--reference",
            str(tmp_path / "ttur.npz")]
    with pytest.raises(SystemExit, match="sFID needs spatial statistics"):
        main([*args, "--metrics", "sfid"])
    auto = main([*args, "--metrics", "auto"])  # auto leaves out what the reference cannot give
    assert "fid" in auto and "sfid" not in auto and "precision" not in auto


def test_precision_recall_memory_is_bounded_by_the_tile(monkeypatch):
    """No distance block larger than block x block is ever built (ADM's full rows would be block x N)."""
    from genaccel.eval import inception

    shapes = []
    real = inception._sq_dist
    monkeypatch.setattr(inception, "_sq_dist", lambda u, v: shapes.append((len(u), len(v))) or real(u, v))
    gen, ref = torch.from_numpy(_features(6, 530)), torch.from_numpy(_features(7, 200))
    tiled = precision_recall(gen, ref, block=64)
    assert max(max(s) for s in shapes) == 64
    monkeypatch.setattr(inception, "_sq_dist", real)
    assert tiled == precision_recall(gen, ref)
