"""All quality metrics of one sample set, by name: FD-domain, class accuracy, FID, IS, precision/recall.

``fd_domain`` / ``class_accuracy`` use the bundled crop classifier and need nothing from outside; ``fid``,
``is`` and ``prc`` need local Inception weights and (FID, P&R) a reference. Names in the output are
explicit: ``fd_domain`` is never called FID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genaccel.eval.fd import FeatureStats, fd_from_stats, feature_stats, load_stats
from genaccel.utils.io import stored_path

DOMAIN_METRICS = ("fd_domain", "class_accuracy")
INCEPTION_METRICS = ("fid", "is", "prc")
ALL_METRICS = DOMAIN_METRICS + INCEPTION_METRICS


@dataclass
class Reference:
    """A reference set: its statistics, and its features when images were available (needed for P&R)."""

    stats: FeatureStats
    features: torch.Tensor | None
    source: str


def parse_metrics(spec: str, weights: str | None = None, reference: str | None = None) -> list[str]:
    """Metric names from ``spec``, checked against the inputs they need before any work is done.

    'auto' = FD-domain + class accuracy, plus IS when Inception weights are given, plus FID and P&R when a
    reference is given too; 'none' = nothing; otherwise a comma list. Raises naming the missing input.
    """
    if spec == "none":
        return []
    if spec == "auto":
        names = list(DOMAIN_METRICS)
        if weights:
            names += ["is"] + (["fid", "prc"] if reference else [])
        return names
    names = [m.strip().replace("-", "_") for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}, 'auto' or 'none'")
    if any(m in INCEPTION_METRICS for m in names):
        from genaccel.eval.inception import resolve_weights

        resolve_weights(weights)
    needs_ref = [m for m in names if m in ("fid", "prc")]
    if needs_ref and not reference:
        raise ValueError(f"{needs_ref} need a reference: pass --reference (ADM reference .npz or image folder)")
    return names


def is_stats_file(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as z:
        return "mu" in z.files and "sigma" in z.files


def domain_reference(spec: str, extractor, per_class: int = 64, size: int = 64) -> Reference:
    """FD-domain reference: 'heldout' (bundled held-out crops at ``size``, the generated images' side), a
    stats ``.npz`` (mu/sigma), or images."""
    from genaccel.eval.images import load_images

    if spec == "heldout":
        from genaccel.eval.fd import heldout_reference_images

        feats = extractor.features(heldout_reference_images(per_class, seed=123, size=size))
        return Reference(feature_stats(feats), feats, f"heldout crops ({per_class}/class, {size}x{size}, seed 123, uint8)")
    path = Path(spec)
    if is_stats_file(path):
        return Reference(load_stats(path, dim=extractor.feature_dim), None, stored_path(path))
    feats = extractor.features(torch.from_numpy(load_images(path)))
    return Reference(feature_stats(feats), feats, stored_path(path))


def inception_reference(path: str | os.PathLike, model, batch_size: int = 32) -> Reference:
    """Inception reference from an ADM reference ``.npz`` (``mu``/``sigma``, optional ``arr_0``) or images."""
    from genaccel.eval.images import load_images, npz_keys
    from genaccel.eval.inception import POOL, inception_features

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference not found: {path} (an ADM reference .npz or a folder of images)")
    if is_stats_file(path):
        stats = load_stats(path, dim=2048)
        feats = None
        if "arr_0" in npz_keys(path):
            feats = inception_features(model, load_images(path), batch_size)[POOL]
        return Reference(stats, feats, stored_path(path))
    feats = inception_features(model, load_images(path), batch_size)[POOL]
    return Reference(feature_stats(feats), feats, stored_path(path))


def compute_metrics(
    images: np.ndarray,
    labels: np.ndarray | None,
    metrics: list[str],
    domain_ref: str = "heldout",
    reference: str | None = None,
    inception_weights: str | None = None,
    classifier_path: str | None = None,
    batch_size: int = 64,
) -> dict:
    """Compute ``metrics`` for uint8 NHWC ``images``; returns values plus where each reference came from."""
    out: dict = {"num_images": len(images)}
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if any(m in DOMAIN_METRICS for m in metrics):
        from genaccel.eval.feature_extractor import load_feature_extractor

        extractor = load_feature_extractor(classifier_path)
        if "fd_domain" in metrics:
            side = images.shape[1]  # held-out crops as large as the images (128px: same field of view as 64px)
            ref = domain_reference(domain_ref, extractor, size=side if side % 64 == 0 and side <= 128 else 64)
            out["fd_domain"] = fd_from_stats(feature_stats(extractor.features(tensor, batch_size)), ref.stats)
            out["fd_domain_reference"] = ref.source
        if "class_accuracy" in metrics:
            out.update(_class_accuracy(extractor, tensor, labels))
    if any(m in INCEPTION_METRICS for m in metrics):
        out.update(_inception_metrics(images, metrics, reference, inception_weights))
    return out


def _class_accuracy(extractor, images: torch.Tensor, labels: np.ndarray | None) -> dict:
    if labels is None:
        raise ValueError("class_accuracy needs the requested labels (ADM 'arr_1'); drop it from --metrics otherwise")
    labels = torch.as_tensor(np.asarray(labels)).long()
    if int(labels.max()) >= extractor.config.num_classes:
        raise ValueError(
            f"labels go up to {int(labels.max())} but the crop classifier knows {extractor.config.num_classes} classes: "
            "class_accuracy only applies to models trained on the bundled crops"
        )
    from genaccel.eval.fd import class_accuracy

    return {"class_accuracy": class_accuracy(images, labels, extractor)}


def _inception_metrics(images: np.ndarray, metrics: list[str], reference: str | None,
                       weights: str | None) -> dict:
    from genaccel.eval.images import npz_keys
    from genaccel.eval.inception import (
        LOGITS,
        POOL,
        inception_features,
        inception_score,
        load_inception,
        precision_recall,
        resolve_weights,
    )

    model = load_inception(weights)  # raises naming the missing file / flag before any work
    needs_ref = [m for m in metrics if m in ("fid", "prc")]
    if needs_ref and not reference:
        raise ValueError(f"{needs_ref} need a reference: pass --reference (ADM reference .npz or image folder)")
    if "prc" in metrics and is_stats_file(Path(reference)) and "arr_0" not in npz_keys(reference):
        raise ValueError(f"precision/recall need reference images, but {reference} holds only mu/sigma (no arr_0)")
    gen = inception_features(model, images)
    out: dict = {"inception": "torch-fidelity inception-v3-compat (TF1 bilinear resize)", "inception_weights": str(resolve_weights(weights))}
    if "is" in metrics:
        out.update(inception_score(gen[LOGITS], splits=min(10, len(images))))
    if needs_ref:
        ref = inception_reference(reference, model)
        out["reference"] = ref.source
        if "fid" in metrics:
            out["fid"] = fd_from_stats(feature_stats(gen[POOL]), ref.stats)
        if "prc" in metrics:
            out.update(precision_recall(gen[POOL], ref.features))
    return out


__all__ = ["ALL_METRICS", "DOMAIN_METRICS", "INCEPTION_METRICS", "Reference", "compute_metrics", "domain_reference",
           "inception_reference", "parse_metrics"]
