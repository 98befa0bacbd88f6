"""All quality metrics of one sample set, by name: FD-domain, class accuracy, FID, sFID, IS, precision/recall.

``fd_domain`` / ``class_accuracy`` use the bundled crop classifier and need nothing from outside; ``fid``,
``sfid``, ``is`` and ``prc`` need local Inception weights and (all but IS) a reference. Names in the output
are explicit: ``fd_domain`` is never called FID.

Reference handling follows the ADM evaluator: a reference ``.npz`` that carries ``mu``/``sigma`` (and
``mu_s``/``sigma_s``) is used as is, and its images (``arr_0``) are only read when precision/recall need
features. Reference features are cached by content hash (:mod:`genaccel.eval.cache`).
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
INCEPTION_METRICS = ("fid", "sfid", "is", "prc")
REFERENCE_METRICS = ("fid", "sfid", "prc")
ALL_METRICS = DOMAIN_METRICS + INCEPTION_METRICS
PRC_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Reference:
    """A reference set: its statistics, and its features when images were available (needed for P&R)."""

    stats: FeatureStats
    features: torch.Tensor | None
    source: str
    spatial: FeatureStats | None = None
    stats_from: str = "images"


@dataclass(frozen=True)
class ReferenceContents:
    """What a reference path offers: pool statistics, spatial (sFID) statistics, images."""

    stats: bool
    spatial: bool
    images: bool


def reference_contents(path: str | os.PathLike) -> ReferenceContents:
    """Inspect a reference (keys of an ``.npz``, or a folder) without reading any array."""
    path = Path(path)
    if path.is_dir():
        return ReferenceContents(stats=False, spatial=False, images=True)
    if path.suffix != ".npz" or not path.is_file():
        return ReferenceContents(False, False, False)
    with np.load(path) as z:
        keys = set(z.files)
    stats = {"mu", "sigma"} <= keys
    return ReferenceContents(stats, stats and {"mu_s", "sigma_s"} <= keys, "arr_0" in keys)


def parse_metrics(spec: str, weights: str | None = None, reference: str | None = None) -> list[str]:
    """Metric names from ``spec``, checked against the inputs they need before any work is done.

    'auto' = FD-domain + class accuracy, plus IS when Inception weights are given, plus FID, and sFID and P&R
    where the reference provides what they need (spatial statistics or images; images), when a reference is
    given too; 'none' = nothing; otherwise a comma list. Raises naming the missing input.
    """
    if spec == "none":
        return []
    contents = reference_contents(reference) if reference else None
    if spec == "auto":
        names = list(DOMAIN_METRICS)
        if weights:
            names.append("is")
            if contents is not None:
                names.append("fid")
                names += ["sfid"] if contents.spatial or contents.images else []
                names += ["prc"] if contents.images else []
        return names
    names = [m.strip().replace("-", "_") for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}, 'auto' or 'none'")
    if any(m in INCEPTION_METRICS for m in names):
        from genaccel.eval.inception import resolve_weights

        resolve_weights(weights)
    needs_ref = [m for m in names if m in REFERENCE_METRICS]
    if needs_ref and not reference:
        raise ValueError(f"{needs_ref} need a reference: pass --reference (ADM reference .npz or image folder)")
    if needs_ref:
        _check_reference(Path(reference), contents, names)
    return names


def _check_reference(path: Path, contents: ReferenceContents, names: list[str]) -> None:
    if not path.exists():
        raise FileNotFoundError(f"reference not found: {path} (an ADM reference .npz or a folder of images)")
    if not (contents.stats or contents.images):
        raise ValueError(f"{path}: a reference is an .npz with 'mu'/'sigma' and/or 'arr_0', or a folder of images")
    if "prc" in names and not contents.images:
        raise ValueError(f"precision/recall need reference images, but {path} holds only mu/sigma (no arr_0)")
    if "sfid" in names and not (contents.spatial or contents.images):
        raise ValueError(f"sFID needs spatial statistics, but {path} has no 'mu_s'/'sigma_s' and no images (arr_0); "
                         "rebuild it with genaccel eval stats --features inception")


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


def inception_reference(path: str | os.PathLike, model, need_features: bool = False, need_spatial: bool = False,
                        batch_size: int = 32, cache_dir: str | os.PathLike | None = None,
                        weights: str | os.PathLike | None = None, progress: bool = False) -> Reference:
    """Inception reference from an ADM reference ``.npz`` (``mu``/``sigma``[, ``mu_s``/``sigma_s``][, ``arr_0``])
    or images.

    As ADM's ``read_statistics``, statistics stored in the file win over statistics of its images. Images are
    only read when needed (``need_features`` for P&R, or spatial statistics the file lacks), streamed in
    batches, and their features come from / go to the cache in ``cache_dir`` (None: no cache)."""
    path = Path(path)
    contents = reference_contents(path)
    if not (contents.stats or contents.images):
        if not path.exists():
            raise FileNotFoundError(f"reference not found: {path} (an ADM reference .npz or a folder of images)")
        raise ValueError(f"{path}: a reference is an .npz with 'mu'/'sigma' and/or 'arr_0', or a folder of images")
    file_stats = load_stats(path, dim=2048) if contents.stats else None
    file_spatial = load_stats(path, spatial=True) if contents.spatial else None
    if file_stats is not None and not need_features and (file_spatial is not None or not need_spatial):
        return Reference(file_stats, None, stored_path(path), file_spatial, stats_from="file")
    if not contents.images:
        raise ValueError(f"{path} holds no images (arr_0) to compute the missing reference features from")
    from genaccel.eval.cache import reference_features

    cached = reference_features(path, model, weights, cache_dir, batch_size, progress)
    stats_from = "file" if file_stats is not None else ("cache" if cached.from_cache else "images")
    return Reference(file_stats or cached.stats, cached.pool, stored_path(path), file_spatial or cached.spatial,
                     stats_from=stats_from)


def compute_metrics(
    images,
    labels: np.ndarray | None,
    metrics: list[str],
    domain_ref: str = "heldout",
    reference: str | None = None,
    inception_weights: str | None = None,
    classifier_path: str | None = None,
    batch_size: int = 64,
    is_protocol: str = "adm",
    prc_dtype: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    device: str | torch.device = "cpu",
    generated_inception=None,
) -> dict:
    """Compute ``metrics`` for uint8 NHWC ``images`` (an array, or an ``ImageSource`` streamed in batches);
    returns values plus where each reference came from and which protocol made them. Inception runs on
    ``device``; ``generated_inception`` (an ``InceptionFeatures`` of ``images``, e.g. gathered from ranks by
    :func:`sharded_inception_features`) skips extracting the generated set again."""
    from genaccel.eval.images import ImageSource, open_images

    source = images if isinstance(images, ImageSource) else open_images(np.ascontiguousarray(images))
    out: dict = {"num_images": len(source)}
    if any(m in DOMAIN_METRICS for m in metrics):
        from genaccel.eval.feature_extractor import load_feature_extractor

        extractor = load_feature_extractor(classifier_path)
        feats, preds = _domain_outputs(extractor, source, batch_size, "class_accuracy" in metrics)
        if "fd_domain" in metrics:
            side = source.image_shape[0]  # held-out crops as large as the images (128px: same view as 64px)
            ref = domain_reference(domain_ref, extractor, size=side if side % 64 == 0 and side <= 128 else 64)
            out["fd_domain"] = fd_from_stats(feature_stats(feats), ref.stats)
            out["fd_domain_reference"] = ref.source
        if "class_accuracy" in metrics:
            out.update(_class_accuracy(extractor, preds, labels))
    if any(m in INCEPTION_METRICS for m in metrics):
        out.update(_inception_metrics(source, metrics, reference, inception_weights, is_protocol, prc_dtype,
                                      cache_dir, progress, device, generated_inception, batch_size))
    return out


@torch.no_grad()
def _domain_outputs(extractor, source, batch_size: int, predict: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop-classifier features (N, 128) and, if asked, predicted classes, streamed over the image batches."""
    feats, preds = [], []
    for batch in source.batches(batch_size):
        x = torch.from_numpy(np.ascontiguousarray(batch))
        feats.append(extractor.features(x, batch_size))
        if predict:
            preds.append(extractor.predict(x, batch_size))
    return torch.cat(feats), (torch.cat(preds) if predict else None)


def _class_accuracy(extractor, predictions: torch.Tensor, labels: np.ndarray | None) -> dict:
    if labels is None:
        raise ValueError("class_accuracy needs the requested labels (ADM 'arr_1'); drop it from --metrics otherwise")
    labels = torch.as_tensor(np.asarray(labels)).long()
    if int(labels.max()) >= extractor.config.num_classes:
        raise ValueError(
            f"labels go up to {int(labels.max())} but the crop classifier knows {extractor.config.num_classes} classes: "
            "class_accuracy only applies to models trained on the bundled crops"
        )
    if len(labels) != len(predictions):
        raise ValueError(f"{len(predictions)} images but {len(labels)} labels: pass one requested label per image")
    return {"class_accuracy": float((predictions.cpu() == labels).float().mean())}


def sharded_inception_features(samples: str | os.PathLike, weights: str | None, info, device: str | torch.device,
                               batch_size: int = 32):
    """Inception features of an ADM ``.npz`` computed by all ranks and gathered on rank 0 (None elsewhere).

    Rank ``r`` of ``W`` embeds batches ``b`` with ``b % W == r`` (streamed from the file); rank 0 puts them back
    in file order (ADM's IS splits are consecutive) and merges the spatial statistics. One process: plain
    extraction."""
    import torch.distributed as dist

    from genaccel.eval.fd import RunningStats
    from genaccel.eval.images import open_images
    from genaccel.eval.inception import InceptionFeatures, inception_features, load_inception

    model = load_inception(weights, device)
    if info.world == 1:
        return inception_features(model, open_images(samples), batch_size, progress=False)
    mine = []
    for b, batch in enumerate(open_images(samples).batches(batch_size)):
        if b % info.world == info.rank:
            f = inception_features(model, batch, batch_size, progress=False)
            mine.append((b, f.pool, f.logits, f.spatial))
    gathered = [None] * info.world if info.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    if not info.is_main:
        return None
    parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
    spatial = RunningStats()
    for p in parts:
        spatial.merge(p[3])
    return InceptionFeatures(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), spatial)


def _inception_metrics(source, metrics: list[str], reference: str | None, weights: str | None, is_protocol: str,
                       prc_dtype: str, cache_dir, progress: bool, device: str | torch.device = "cpu",
                       generated=None, batch_size: int = 32) -> dict:
    from genaccel.eval.inception import (
        inception_features,
        inception_score,
        load_inception,
        precision_recall,
        resolve_weights,
    )

    if prc_dtype not in PRC_DTYPES:
        raise ValueError(f"unknown precision/recall dtype {prc_dtype!r}; choose from {', '.join(PRC_DTYPES)}")
    model = load_inception(weights, device)  # raises naming the missing file / flag before any work
    needs_ref = [m for m in metrics if m in REFERENCE_METRICS]
    if needs_ref:
        if not reference:
            raise ValueError(f"{needs_ref} need a reference: pass --reference (ADM reference .npz or image folder)")
        _check_reference(Path(reference), reference_contents(reference), metrics)
    gen = generated if generated is not None else inception_features(model, source, batch_size, progress=progress)
    if len(gen) != len(source):
        raise ValueError(f"{len(gen)} generated Inception features for {len(source)} images")
    out: dict = {"inception": "torch-fidelity inception-v3-compat (TF1 bilinear resize)",
                 "inception_weights": stored_path(resolve_weights(weights))}
    if "is" in metrics:
        out.update(inception_score(gen.logits, is_protocol, splits=min(10, len(gen))))
    if needs_ref:
        ref = inception_reference(reference, model, need_features="prc" in metrics, need_spatial="sfid" in metrics,
                                  batch_size=batch_size, cache_dir=cache_dir, weights=resolve_weights(weights),
                                  progress=progress)
        out["reference"] = ref.source
        out["reference_stats_from"] = ref.stats_from
        if "fid" in metrics:
            out["fid"] = fd_from_stats(feature_stats(gen.pool), ref.stats)
        if "sfid" in metrics:
            out["sfid"] = fd_from_stats(gen.spatial.stats(), ref.spatial)
        if "prc" in metrics:
            out.update(precision_recall(gen.pool, ref.features, dtype=PRC_DTYPES[prc_dtype]))
            out["prc_protocol"] = f"adm (k=3, squared distances in {prc_dtype})"
    return out


__all__ = ["ALL_METRICS", "DOMAIN_METRICS", "INCEPTION_METRICS", "Reference", "ReferenceContents", "compute_metrics",
           "domain_reference", "inception_reference", "parse_metrics", "reference_contents",
           "sharded_inception_features"]
