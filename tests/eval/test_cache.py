"""Reference features cached by content hash; stats stored in a reference file are used without reading arr_0."""

import numpy as np
import pytest

from genaccel.eval import inception
from genaccel.eval.__main__ import main
from genaccel.eval.cache import content_hash, default_cache_dir
from genaccel.eval.images import save_adm_npz


def _images(seed: int, n: int = 4, size: int = 32) -> np.ndarray:
    """Four generated / five reference images by default: distinct counts name the set each extraction ran on,
    and P&R's k=3 needs at least 4 per set."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def count_extractions(monkeypatch):
    """Number of image sets run through Inception (generated + reference)."""
    calls = []
    real = inception.inception_features

    def counting(model, images, *args, **kwargs):
        calls.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(inception, "inception_features", counting)
    return calls


def test_reference_features_are_cached_by_content(tmp_path, random_inception, count_extractions):
    save_adm_npz(tmp_path / "gen.npz", _images(0))
    save_adm_npz(tmp_path / "ref.npz", _images(1, n=5))
    cache = tmp_path / "cache"
    args = ["metrics", str(tmp_path / "gen.npz"), "--inception-weights", str(random_inception), "--cache-dir",
            str(cache)]
    first = main([*args, "--metrics", "fid,prc", "--reference", str(tmp_path / "ref.npz")])
    assert count_extractions == [4, 5] and len(list(cache.glob("inception-*.npz"))) == 1
    (tmp_path / "ref.npz").rename(tmp_path / "moved.npz")  # same bytes, other name: still a hit
    second = main([*args, "--metrics", "fid,prc", "--reference", str(tmp_path / "moved.npz")])
    assert count_extractions == [4, 5, 4]
    assert second["fid"] == first["fid"] and second["precision"] == first["precision"]
    assert second["reference_stats_from"] == "cache"
    # hit or miss only: P&R alone reads the reference features without the 2048-d FID eigenvalues
    save_adm_npz(tmp_path / "other.npz", _images(2, n=5))  # other bytes: a miss
    main([*args, "--metrics", "prc", "--reference", str(tmp_path / "other.npz")])
    assert count_extractions == [4, 5, 4, 4, 5]
    off = [*args[:-1], "none", "--metrics", "prc", "--reference", str(tmp_path / "moved.npz")]
    assert main(off)["reference_stats_from"] == "images"  # cache off: computed again
    assert count_extractions[-1] == 5


def test_damaged_cache_entry_is_recomputed(tmp_path, random_inception, count_extractions):
    save_adm_npz(tmp_path / "gen.npz", _images(0))
    save_adm_npz(tmp_path / "ref.npz", _images(1, n=6))  # density/coverage k=5: > 5
    # P&R and density/coverage read the reference features (no 2048-d FID eigenvalues needed to see a recompute)
    args = ["metrics", str(tmp_path / "gen.npz"), "--metrics", "prc,dc", "--inception-weights",
            str(random_inception), "--reference", str(tmp_path / "ref.npz"), "--cache-dir", str(tmp_path / "c")]
    keys = ("precision", "recall", "density", "coverage")
    first = main(args)
    (entry,) = (tmp_path / "c").glob("*.npz")
    entry.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        again = main(args)
    assert [again[k] for k in keys] == [first[k] for k in keys]
    assert again["reference_stats_from"] == "images"
    assert count_extractions == [4, 6, 4, 6]


def test_stats_in_the_reference_file_are_used_without_reading_arr_0(tmp_path, random_inception, count_extractions):
    save_adm_npz(tmp_path / "gen.npz", _images(0))
    rng = np.random.default_rng(0)
    mu, mu_s = rng.normal(size=2048), rng.normal(size=2023)
    # arr_0 is float: reading it as images would fail, so the FID/sFID run proves it is never touched
    np.savez(tmp_path / "VIRTUAL.npz", mu=mu, sigma=np.eye(2048), mu_s=mu_s, sigma_s=np.eye(2023),
             arr_0=np.zeros((3, 4, 4, 3), np.float32))
    out = main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "fid,sfid", "--inception-weights",
                str(random_inception), "--reference", str(tmp_path / "VIRTUAL.npz")])
    assert count_extractions == [4] and out["reference_stats_from"] == "file"
    assert out["fid"] > 0 and out["sfid"] > 0


def test_content_hash_and_default_dir(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "b.bin").write_bytes(b"x" * 10)
    (tmp_path / "c.bin").write_bytes(b"x" * 9 + b"y")
    assert content_hash(tmp_path / "a.bin") == content_hash(tmp_path / "b.bin") != content_hash(tmp_path / "c.bin")
    monkeypatch.delenv("GENACCEL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "genaccel" / "eval"
