"""All quality metrics of one sample set, by name: FD-domain, class accuracy, FID, sFID, IS, precision/recall.

``fd_domain`` / ``class_accuracy`` use the bundled crop classifier and need nothing from outside; ``fid``,
``sfid``, ``is`` and ``prc`` need local Inception weights and (all but IS) a reference. Names in the output
are explicit: ``fd_domain`` is never called FID.

Reference handling follows the ADM evaluator: a reference ``.npz`` that carries ``mu``/``sigma`` (and
``mu_s``/``sigma_s``) is used as is, and its images (``arr_0``) are only read when precision/recall need
features. Reference features are cached by content hash (:mod:`genaccel.eval.cache`).

The feature-space metrics ``fd``, ``kid``, ``prc`` (precision, recall, F-score) and ``dc`` (density, coverage) run on
the network chosen by ``feature_extractor`` (:mod:`genaccel.eval.extractors`: ``domain``, ``inception``,
``clip:<dir>``, ``dinov2:<dir>``; ``auto`` = Inception when its weights are given, else the crop classifier). Their
keys carry the network: Inception's keep the usual names (``fid``, ``kid_mean``, ``precision``, ``density``), the
others are suffixed (``fd_domain``, ``kd_domain_mean``, ``precision_domain``, ``density_clip``). ``fid``, ``sfid`` and
``is`` are Inception metrics by definition and ``fd_domain`` / ``class_accuracy`` crop-classifier ones, whatever
``feature_extractor`` says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from genaccel.eval.density_coverage import DC_K
from genaccel.eval.fd import FeatureStats, fd_from_stats, feature_stats, load_stats
from genaccel.eval.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS
from genaccel.utils.io import stored_path

DOMAIN_METRICS = ("fd_domain", "class_accuracy")
INCEPTION_METRICS = ("fid", "sfid", "is")  # Inception by definition
FEATURE_METRICS = ("prc", "fd", "kid", "dc")  # on the chosen --feature-extractor
FEATURE_SET_METRICS = ("prc", "kid", "dc")  # need reference features, not only mu/sigma
REFERENCE_METRICS = ("fid", "sfid", *FEATURE_METRICS)
ALL_METRICS = DOMAIN_METRICS + INCEPTION_METRICS + FEATURE_METRICS
PRC_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class FeatureMetricOptions:
    """Settings of the feature-space metrics: KID's subsets (torch-fidelity's defaults), density/coverage's k,
    the precision/recall distance dtype."""

    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    kid_seed: int = KID_SEED
    dc_k: int = DC_K
    prc_dtype: str = "fp32"


def extractor_kind(feature_extractor: str | None, weights: str | os.PathLike | None = None) -> str:
    """``domain``, ``inception``, ``clip``, ``dinov2``, ... for a ``--feature-extractor`` value (``auto`` resolved)."""
    from genaccel.eval.extractors import parse_feature_extractor, resolve_feature_extractor

    return parse_feature_extractor(resolve_feature_extractor(feature_extractor, weights))[0]


def needs_inception(metrics: list[str], feature_extractor: str | None = "auto",
                    weights: str | os.PathLike | None = None) -> bool:
    """Whether ``metrics`` run InceptionV3: FID/sFID/IS always, the feature metrics when it is the extractor."""
    if any(m in INCEPTION_METRICS for m in metrics):
        return True
    return any(m in FEATURE_METRICS for m in metrics) and extractor_kind(feature_extractor, weights) == "inception"


def feature_metric_key(name: str, label: str) -> str:
    """Output key of a feature-space value: Inception keeps the usual names (``fd`` -> ``fid``, ``kd_mean`` ->
    ``kid_mean``, ``precision``), other networks are suffixed (``fd_domain``, ``kd_clip_mean``, ``coverage_dinov2``)."""
    if label == "inception":
        return {"fd": "fid", "kd_mean": "kid_mean", "kd_std": "kid_std"}.get(name, name)
    if name.startswith("kd_"):
        return f"kd_{label}_{name[3:]}"
    return f"{name}_{label}"


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


def parse_metrics(spec: str, weights: str | None = None, reference: str | None = None,
                  feature_extractor: str | None = "auto", domain_reference: str = "heldout") -> list[str]:
    """Metric names from ``spec``, checked against the inputs they need before any work is done.

    'auto' = FD-domain + class accuracy; plus IS when Inception weights are given; with a reference, FID (and sFID
    where the reference has spatial statistics or images) when weights are given, and on a ``feature_extractor``
    other than the crop classifier ``fd`` (unless it is Inception, whose FD is FID) and, when the reference has
    images, ``prc`` and ``dc``. 'none' = nothing; otherwise a comma list. Raises naming the missing input."""
    from genaccel.eval.extractors import resolve_feature_extractor

    extractor = resolve_feature_extractor(feature_extractor, weights)  # unknown name / missing folder: one error
    kind = extractor_kind(extractor)
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
        if contents is not None and kind != "domain":
            names += ["fd"] if kind != "inception" else []
            names += ["prc", "dc"] if contents.images else []
    else:
        names = [m.strip().replace("-", "_") for m in spec.split(",") if m.strip()]
        unknown = [m for m in names if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}, 'auto' or 'none'")
    if needs_inception(names, extractor):
        from genaccel.eval.inception import resolve_weights

        resolve_weights(weights)
    if kind == "domain":
        _check_domain_reference(domain_reference, [m for m in names if m in FEATURE_SET_METRICS])
    needs_ref = [m for m in names if m in REFERENCE_METRICS and not (kind == "domain" and m in FEATURE_METRICS)]
    if needs_ref and not reference:
        raise ValueError(f"{needs_ref} need a reference: pass --reference (ADM reference .npz or image folder)")
    if needs_ref:
        _check_reference(Path(reference), contents, names, kind)
    return names


def _check_domain_reference(spec: str, set_metrics: list[str]) -> None:
    if set_metrics and spec != "heldout" and is_stats_file(Path(spec)):
        raise ValueError(f"{set_metrics} on crop-classifier features need reference images, but --domain-reference "
                         f"{spec} holds only mu/sigma: use 'heldout' or an image set")


def _check_reference(path: Path, contents: ReferenceContents, names: list[str], kind: str = "inception") -> None:
    if not path.exists():
        raise FileNotFoundError(f"reference not found: {path} (an ADM reference .npz or a folder of images)")
    if not (contents.stats or contents.images):
        raise ValueError(f"{path}: a reference is an .npz with 'mu'/'sigma' and/or 'arr_0', or a folder of images")
    set_metrics = [m for m in names if m in FEATURE_SET_METRICS]
    if set_metrics and not contents.images:
        raise ValueError(f"{set_metrics} need reference images, but {path} holds only mu/sigma (no arr_0)")
    if kind not in ("domain", "inception") and "fd" in names and not contents.images:
        raise ValueError(f"fd on {kind} features needs reference images: the mu/sigma in {path} are Inception "
                         "statistics, which do not apply to another network")
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
    feature_extractor: str | None = "auto",
    options: FeatureMetricOptions | None = None,
) -> dict:
    """Compute ``metrics`` for uint8 NHWC ``images`` (an array, or an ``ImageSource`` streamed in batches);
    returns values plus where each reference came from and which protocol made them. Inception runs on
    ``device``; ``generated_inception`` (an ``InceptionFeatures`` of ``images``, e.g. gathered from ranks by
    :func:`sharded_inception_features`) skips extracting the generated set again. ``fd``/``kid``/``prc``/``dc``
    run on ``feature_extractor`` with ``options`` (default :class:`FeatureMetricOptions`; its ``prc_dtype`` is
    overridden by the ``prc_dtype`` argument)."""
    from genaccel.eval.extractors import resolve_feature_extractor
    from genaccel.eval.images import ImageSource, open_images

    if prc_dtype not in PRC_DTYPES:
        raise ValueError(f"unknown precision/recall dtype {prc_dtype!r}; choose from {', '.join(PRC_DTYPES)}")
    opts = replace(options or FeatureMetricOptions(), prc_dtype=prc_dtype)
    spec = resolve_feature_extractor(feature_extractor, inception_weights)
    kind = extractor_kind(spec)
    feature_metrics = [m for m in metrics if m in FEATURE_METRICS]
    source = images if isinstance(images, ImageSource) else open_images(np.ascontiguousarray(images))
    if "kid" in metrics and len(source) < opts.kid_subset_size:  # before any network runs
        raise ValueError(f"KID subsets of {opts.kid_subset_size} need at least {opts.kid_subset_size} images per "
                         f"side, got {len(source)} generated: lower --kid-subset-size (at most {len(source)}) or "
                         "use more images")
    out: dict = {"num_images": len(source)}
    on_domain = feature_metrics if kind == "domain" else []
    if any(m in DOMAIN_METRICS for m in metrics) or on_domain:
        from genaccel.eval.feature_extractor import load_feature_extractor

        extractor = load_feature_extractor(classifier_path)
        feats, preds = _domain_outputs(extractor, source, batch_size, "class_accuracy" in metrics)
        if "fd_domain" in metrics or on_domain:
            side = source.image_shape[0]  # held-out crops as large as the images (128px: same view as 64px)
            ref = domain_reference(domain_ref, extractor, size=side if side % 64 == 0 and side <= 128 else 64)
            if "fd_domain" in metrics:
                out["fd_domain"] = fd_from_stats(feature_stats(feats), ref.stats)
            out["fd_domain_reference"] = ref.source
            if on_domain:
                out["feature_extractor"] = f"domain: crop classifier ({extractor.feature_dim}-d pooled features)"
                out.update(feature_space_metrics(feats, ref, on_domain, "domain", opts))
        if "class_accuracy" in metrics:
            out.update(_class_accuracy(extractor, preds, labels))
    if needs_inception(metrics, spec):
        out.update(_inception_metrics(source, metrics, reference, inception_weights, is_protocol, opts,
                                      cache_dir, progress, device, generated_inception, batch_size,
                                      feature_metrics if kind == "inception" else []))
    if kind not in ("domain", "inception") and feature_metrics:
        out.update(_extractor_metrics(spec, source, reference, feature_metrics, opts, batch_size, device))
    return out


def feature_space_metrics(generated: torch.Tensor, ref: Reference, metrics: list[str], label: str,
                          options: FeatureMetricOptions | None = None,
                          device: str | torch.device | None = None) -> dict:
    """``fd``, ``kid``, ``prc`` (precision, recall, F-score) and ``dc`` (density, coverage) of generated features
    (N, d) against a reference of the same network; keys named by :func:`feature_metric_key`."""
    from genaccel.eval.density_coverage import dc_protocol, density_coverage, f_score
    from genaccel.eval.inception import precision_recall
    from genaccel.eval.kid import kernel_distance, kid_protocol

    opts = options or FeatureMetricOptions()
    values: dict = {}
    if "fd" in metrics:
        values["fd"] = fd_from_stats(feature_stats(generated), ref.stats)
    needs_features = [m for m in metrics if m in FEATURE_SET_METRICS]
    if needs_features and ref.features is None:
        raise ValueError(f"{needs_features} need reference features, but {ref.source} gave only statistics: "
                         "use reference images")
    protocols: dict = {}
    if "kid" in metrics:
        kid = kernel_distance(generated, ref.features, opts.kid_subsets, opts.kid_subset_size, seed=opts.kid_seed,
                              device=device)
        values.update(kd_mean=kid["mean"], kd_std=kid["std"])
        protocols["kid_protocol"] = kid_protocol(opts.kid_subsets, opts.kid_subset_size, opts.kid_seed)
    if "prc" in metrics:
        pr = precision_recall(generated, ref.features, dtype=PRC_DTYPES[opts.prc_dtype], device=device)
        values.update(pr, f_score=f_score(pr["precision"], pr["recall"]))
        protocols["prc_protocol"] = f"adm (k=3, squared distances in {opts.prc_dtype}); f_score = F1 (torch-fidelity)"
    if "dc" in metrics:
        values.update(density_coverage(generated, ref.features, opts.dc_k, device=device))
        protocols["dc_protocol"] = dc_protocol(opts.dc_k)
    return {**{feature_metric_key(k, label): v for k, v in values.items()}, **protocols}


def _extractor_metrics(spec: str, source, reference: str | None, metrics: list[str], opts: FeatureMetricOptions,
                       batch_size: int, device: str | torch.device) -> dict:
    """Feature metrics on a registered network other than the crop classifier and Inception (CLIP, DINOv2, ...):
    both sides embedded here from images (a reference's stored mu/sigma are Inception's and do not apply)."""
    from genaccel.eval.extractors import build_feature_extractor

    if not reference:
        raise ValueError(f"{metrics} need a reference: pass --reference (ADM reference .npz or image folder)")
    _check_reference(Path(reference), reference_contents(reference), metrics, spec.partition(":")[0])
    ext = build_feature_extractor(spec, device=device)
    gen = embed_images(ext, source, batch_size)
    ref_feats = embed_images(ext, reference, batch_size)
    ref = Reference(feature_stats(ref_feats), ref_feats, stored_path(reference))
    return {"feature_extractor": ext.description, "reference": ref.source,
            **feature_space_metrics(gen, ref, metrics, ext.label, opts)}


def embed_images(extractor, images, batch_size: int = 64) -> torch.Tensor:
    """Features (N, dim) of uint8 NHWC images (array, ``ImageSource``, ``.npz`` or folder), streamed in batches."""
    from genaccel.eval.images import ImageSource, open_images

    source = images if isinstance(images, ImageSource) else open_images(images)
    return torch.cat([extractor.features(b) for b in source.batches(batch_size)])


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
                       opts: FeatureMetricOptions, cache_dir, progress: bool, device: str | torch.device = "cpu",
                       generated=None, batch_size: int = 32, feature_metrics: list[str] | None = None) -> dict:
    """FID, sFID, IS, and the feature metrics (``feature_metrics``) on Inception pool features."""
    from genaccel.eval.inception import inception_features, inception_score, load_inception, resolve_weights

    feature_metrics = list(feature_metrics or [])
    model = load_inception(weights, device)  # raises naming the missing file / flag before any work
    needs_ref = [m for m in metrics if m in ("fid", "sfid")] + feature_metrics
    if needs_ref:
        if not reference:
            raise ValueError(f"{needs_ref} need a reference: pass --reference (ADM reference .npz or image folder)")
        _check_reference(Path(reference), reference_contents(reference), needs_ref)
    gen = generated if generated is not None else inception_features(model, source, batch_size, progress=progress)
    if len(gen) != len(source):
        raise ValueError(f"{len(gen)} generated Inception features for {len(source)} images")
    out: dict = {"inception": "torch-fidelity inception-v3-compat (TF1 bilinear resize)",
                 "inception_weights": stored_path(resolve_weights(weights))}
    if "is" in metrics:
        out.update(inception_score(gen.logits, is_protocol, splits=min(10, len(gen))))
    if needs_ref:
        set_metrics = [m for m in feature_metrics if m in FEATURE_SET_METRICS]
        ref = inception_reference(reference, model, need_features=bool(set_metrics), need_spatial="sfid" in metrics,
                                  batch_size=batch_size, cache_dir=cache_dir, weights=resolve_weights(weights),
                                  progress=progress)
        out["reference"] = ref.source
        out["reference_stats_from"] = ref.stats_from
        if "fid" in metrics and "fd" not in feature_metrics:
            feature_metrics.append("fd")
        if "sfid" in metrics:
            out["sfid"] = fd_from_stats(gen.spatial.stats(), ref.spatial)
        if feature_metrics:
            if set(feature_metrics) - {"fd"}:
                out["feature_extractor"] = "inception: torch-fidelity inception-v3-compat pool (2048-d)"
            out.update(feature_space_metrics(gen.pool, ref, feature_metrics, "inception", opts, device=device))
    return out


__all__ = ["ALL_METRICS", "DOMAIN_METRICS", "FEATURE_METRICS", "INCEPTION_METRICS", "FeatureMetricOptions", "Reference",
           "ReferenceContents", "compute_metrics", "domain_reference", "embed_images", "extractor_kind",
           "feature_metric_key", "feature_space_metrics", "inception_reference", "needs_inception", "parse_metrics",
           "reference_contents", "sharded_inception_features"]
