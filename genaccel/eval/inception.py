"""FID / IS / precision-recall with torch-fidelity's InceptionV3 from a local weights file (never a download).

The extractor is torch-fidelity's ``inception-v3-compat`` (TF1-compatible bilinear resize to 299, i.e. the
``antialias=False`` path of torchmetrics), so values follow the TTUR / ADM protocol when the real
``weights-inception-2015-12-05-6726825d.pth`` is supplied. Metric conventions (reference: eval.md §2-4):

* FID on the 2048-d pool features, float64 statistics, trace term from ``eigvals(S1 @ S2)``;
* IS on ``logits_unbiased`` (as the original code and the ADM evaluator), 10 shuffled splits;
* improved precision/recall (Kynkäänniemi et al. 2019) on the same pool features, k = 3, generated = set 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genaccel.eval.fd import FeatureStats, fd_from_stats, feature_stats

WEIGHTS_ENV = "GENACCEL_INCEPTION_WEIGHTS"
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
POOL, LOGITS = "2048", "logits_unbiased"


class InceptionWeightsMissing(FileNotFoundError):
    """No local Inception weights: FID/IS/P&R cannot run offline."""


def resolve_weights(path: str | os.PathLike | None) -> Path:
    """The weights file from ``path`` or ``$GENACCEL_INCEPTION_WEIGHTS``; raises naming what is missing."""
    chosen = path or os.environ.get(WEIGHTS_ENV)
    if not chosen:
        raise InceptionWeightsMissing(
            f"FID/IS/precision-recall need local Inception weights ({WEIGHTS_NAME}): pass --inception-weights PATH "
            f"or set {WEIGHTS_ENV}. Nothing is downloaded. Without them, use FD-domain (the default metric)."
        )
    p = Path(chosen)
    if not p.is_file():
        raise InceptionWeightsMissing(
            f"Inception weights file not found: {p} (expected torch-fidelity's {WEIGHTS_NAME}; check the path)"
        )
    return p


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 giving (pool 2048-d, unbiased logits) from a local file, in eval mode."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = resolve_weights(weights)
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS], feature_extractor_weights_path=str(path))
    except RuntimeError as e:
        raise ValueError(f"{path} is not an InceptionV3 state dict for torch-fidelity: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


@contextmanager
def _no_weight_loading() -> Iterator[None]:
    """Let torch-fidelity build its InceptionV3 with random init instead of loading (or downloading) weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as mod

    saved_url, saved_load = mod.load_state_dict_from_url, mod.FeatureExtractorInceptionV3.load_state_dict
    mod.load_state_dict_from_url = lambda *a, **k: {}
    mod.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        yield
    finally:
        mod.load_state_dict_from_url, mod.FeatureExtractorInceptionV3.load_state_dict = saved_url, saved_load


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-init InceptionV3 state dict (~96 MB) for offline plumbing tests. Its numbers mean nothing."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from genaccel.utils.io import save_torch

    torch.manual_seed(seed)
    with _no_weight_loading():
        model = FeatureExtractorInceptionV3("inception-v3-compat", [POOL])
    return save_torch(model.state_dict(), path)


@torch.no_grad()
def inception_features(
    model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 32, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Pool features (N, 2048) and unbiased logits (N, 1008) for uint8 NHWC images of any size."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception metrics take uint8 NHWC images, got {images.dtype} {tuple(images.shape)}")
    device = next(model.parameters()).device
    pools, logits = [], []
    for chunk in tqdm(images.split(batch_size), desc="inception features", disable=not progress):
        pool, logit = model(chunk.permute(0, 3, 1, 2).contiguous().to(device))
        pools.append(pool.cpu())
        logits.append(logit.cpu())
    return {POOL: torch.cat(pools), LOGITS: torch.cat(logits)}


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict[str, float]:
    """IS mean/std over ``splits`` shuffled splits (torch-fidelity's rule and seed)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if len(logits) < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(logits, splits=splits)
    return {"inception_score_mean": out["inception_score_mean"], "inception_score_std": out["inception_score_std"]}


def precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision/recall: generated inside the real manifold (precision) and vice versa (recall)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    if min(len(generated), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per side")
    precision, recall = calculate_precision_recall_full(generated.double(), real.double(), k, 10000)
    return {"precision": precision, "recall": recall}


def inception_metrics(
    generated: dict[str, torch.Tensor],
    reference_stats: FeatureStats,
    reference_pool: torch.Tensor | None = None,
    splits: int = 10,
) -> dict[str, float]:
    """FID against reference statistics, IS of the generated set, P&R when reference features exist."""
    out = {"fid": fd_from_stats(feature_stats(generated[POOL]), reference_stats)}
    out.update(inception_score(generated[LOGITS], splits=min(splits, len(generated[LOGITS]))))
    if reference_pool is not None:
        out.update(precision_recall(generated[POOL], reference_pool))
    return out


__all__ = [
    "WEIGHTS_ENV",
    "InceptionWeightsMissing",
    "inception_features",
    "inception_metrics",
    "inception_score",
    "load_inception",
    "make_random_inception_weights",
    "precision_recall",
    "resolve_weights",
]
