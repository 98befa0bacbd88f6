"""Helpers shared by the Inception-based eval tests (images and one CLI metrics run over ADM .npz files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genaccel.eval.__main__ import main
from genaccel.eval.images import save_adm_npz


def noisy_images(seed: int, n: int, size: int = 32) -> np.ndarray:
    """``n`` uint8 (size, size, 3) images: one random base image plus independent noise per image."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, 3))
    return np.clip(base + rng.integers(-60, 60, (n, size, size, 3)), 0, 255).astype(np.uint8)


def cli_metrics_run(folder: Path, metrics: str, inception_weights: Path) -> dict:
    """Six generated and five real images saved as ``gen.npz`` / ``real.npz`` in ``folder``, and the CLI's
    ``metrics`` of the first against the second (no feature cache)."""
    gen, real = noisy_images(0, n=6), noisy_images(1, n=5)
    save_adm_npz(folder / "gen.npz", gen)
    save_adm_npz(folder / "real.npz", real)
    ours = main(["metrics", str(folder / "gen.npz"), "--metrics", metrics, "--reference", str(folder / "real.npz"),
                 "--inception-weights", str(inception_weights), "--cache-dir", "none"])
    return {"folder": folder, "gen": gen, "real": real, "ours": ours}
