"""Reference Inception features cached by content hash, so a 10k-image reference batch is embedded once.

A cache entry is keyed by the hash of the reference's bytes (an ``.npz``, or a folder's image names and
bytes) and of the Inception weights file, so renaming or moving a file keeps its entry and changing a byte
(or the weights) makes a new one. It holds the pool features (float32, for precision/recall) and the float64
pool and spatial statistics. The default location is ``$GENACCEL_CACHE_DIR``, else
``$XDG_CACHE_HOME/genaccel/eval``, else ``~/.cache/genaccel/eval``; ``--cache-dir none`` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genaccel.eval.fd import FeatureStats

CACHE_ENV = "GENACCEL_CACHE_DIR"
CACHE_VERSION = 1  # bump when the features of the same bytes change (extractor, resize, spatial layout)
_HASH_CHUNK = 1 << 22


def default_cache_dir() -> Path:
    """Where reference features are cached unless ``--cache-dir`` says otherwise."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genaccel" / "eval"


def resolve_cache_dir(spec: str | os.PathLike | None) -> Path | None:
    """``None`` / ``'default'`` -> :func:`default_cache_dir`; ``'none'`` -> no cache; otherwise that folder."""
    if spec is None or str(spec) == "default":
        return default_cache_dir()
    if str(spec).lower() == "none":
        return None
    return Path(spec)


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)


def content_hash(path: str | os.PathLike) -> str:
    """BLAKE2b of a file's bytes, or of a folder's image file names and bytes (sorted); hex digest."""
    from genaccel.eval.images import IMAGE_EXTS

    path = Path(path)
    h = hashlib.blake2b(digest_size=20)
    if path.is_dir():
        for f in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            h.update(f.name.encode() + b"\0")
            _hash_file(h, f)
    else:
        _hash_file(h, path)
    return h.hexdigest()


@dataclass
class CachedFeatures:
    """Pool features and statistics of one reference set, and whether they came from the cache."""

    pool: torch.Tensor
    stats: FeatureStats
    spatial: FeatureStats
    from_cache: bool


def cache_path(cache_dir: Path, reference: str | os.PathLike, weights: str | os.PathLike) -> Path:
    """The entry file of ``reference`` embedded with ``weights``."""
    return cache_dir / f"inception-v{CACHE_VERSION}-{content_hash(reference)[:24]}-{content_hash(weights)[:12]}.npz"


def _read_entry(path: Path) -> CachedFeatures | None:
    try:
        with np.load(path) as z:
            pool = torch.from_numpy(z["pool"].astype(np.float32))
            stats = FeatureStats(z["mu"], z["sigma"], int(z["num"]))
            spatial = FeatureStats(z["mu_s"], z["sigma_s"], int(z["num"]))
    except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, never fatal
        warnings.warn(f"ignoring unreadable cache entry {path} ({type(e).__name__}: {e}); recomputing", stacklevel=3)
        return None
    if pool.ndim != 2 or len(pool) != stats.num or stats.mu.shape != (pool.shape[1],):
        warnings.warn(f"ignoring inconsistent cache entry {path}; recomputing", stacklevel=3)
        return None
    return CachedFeatures(pool, stats, spatial, from_cache=True)


def _write_entry(path: Path, entry: CachedFeatures, reference: str | os.PathLike) -> None:
    from genaccel.utils.io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, pool=entry.pool.numpy().astype(np.float32), mu=entry.stats.mu, sigma=entry.stats.sigma,
                     mu_s=entry.spatial.mu, sigma_s=entry.spatial.sigma, num=np.int64(entry.stats.num),
                     source=np.array(os.path.abspath(reference)))

    try:
        atomic_write(path, write)
    except OSError as e:  # a read-only or full cache folder costs time, not the result
        warnings.warn(f"could not write the feature cache {path}: {e}", stacklevel=3)


def reference_features(reference: str | os.PathLike, model: torch.nn.Module, weights: str | os.PathLike | None,
                       cache_dir: str | os.PathLike | Path | None, batch_size: int = 32,
                       progress: bool = False) -> CachedFeatures:
    """Inception pool features and pool/spatial statistics of the images in ``reference`` (streamed), read
    from ``cache_dir`` when an entry for these bytes and weights exists, else computed and stored there.
    ``cache_dir=None`` computes without caching; ``weights`` (the file the model was loaded from) is part of the
    key, and caching is skipped when it is unknown."""
    from genaccel.eval.fd import feature_stats
    from genaccel.eval.images import open_images
    from genaccel.eval.inception import inception_features

    entry_path = cache_path(Path(cache_dir), reference, weights) if cache_dir is not None and weights else None
    if entry_path is not None and entry_path.is_file():
        entry = _read_entry(entry_path)
        if entry is not None:
            return entry
    feats = inception_features(model, open_images(reference), batch_size, progress=progress)
    entry = CachedFeatures(feats.pool, feature_stats(feats.pool), feats.spatial.stats(), from_cache=False)
    if entry_path is not None:
        _write_entry(entry_path, entry, reference)
    return entry


__all__ = ["CACHE_ENV", "CachedFeatures", "cache_path", "content_hash", "default_cache_dir", "reference_features",
           "resolve_cache_dir"]
