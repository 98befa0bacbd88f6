"""Feature extractors for the feature-space metrics (FD, KID, precision/recall, density/coverage), by name.

``--feature-extractor`` (and ``compute_metrics(feature_extractor=...)``) takes one of

* ``domain`` — the bundled crop classifier (128-d pooled features; :mod:`genaccel.eval.feature_extractor`);
  its reference is ``--domain-reference`` (held-out crops by default). Works with no download.
* ``inception`` — torch-fidelity's InceptionV3 ``inception-v3-compat`` pool features (2048-d) from the local
  weights file (:mod:`genaccel.eval.inception`); the paper-standard network.
* ``clip:<dir>`` — a CLIP image tower saved with transformers' ``save_pretrained`` (``config.json``, weights and
  ``preprocessor_config.json`` in ``<dir>``): the projected image embedding (``visual_projection`` of the pooled
  output), e.g. 768-d for ViT-L/14 — the FD_CLIP features of Kynkäänniemi et al. 2023.
* ``dinov2:<dir>`` — a DINOv2 model saved by transformers: the CLS token after the final layer norm
  (``pooler_output``), e.g. 1024-d for ViT-L/14 — the FD_DINOv2 features of Stein et al. 2023.
* ``auto`` — ``inception`` when Inception weights are given, else ``domain``.

CLIP / DINOv2 images go through the directory's own image processor (resize, centre crop, normalisation), and
weights are only read from the directory (``local_files_only``): nothing is downloaded. A new network is one
:func:`register_feature_extractor` call with a builder returning a :class:`FeatureExtractor`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class FeatureExtractor:
    """A network as the metrics see it: ``features(uint8 NHWC batch) -> float32 (B, dim)`` on the CPU.

    ``label`` names the metric keys (``fd_<label>``, ``precision_<label>``, ...; Inception's keys keep their usual
    names), ``description`` goes into run records."""

    kind: str
    label: str
    dim: int
    description: str
    embed: Callable[[torch.Tensor], torch.Tensor]
    path: str | None = None

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """Features of one batch of uint8 (B, H, W, 3) images."""
        x = torch.as_tensor(np.ascontiguousarray(images)) if not isinstance(images, torch.Tensor) else images
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"feature extractors take uint8 NHWC images, got {x.dtype} {tuple(x.shape)}")
        return self.embed(x).float().cpu()


@dataclass(frozen=True)
class ExtractorEntry:
    """A registered kind: its builder ``(path, inception_weights, classifier_path, device) -> FeatureExtractor``
    and whether the spec carries a path (``kind:<path>``)."""

    build: Callable[..., FeatureExtractor]
    needs_path: bool
    help: str


_REGISTRY: dict[str, ExtractorEntry] = {}


def register_feature_extractor(kind: str, build: Callable[..., FeatureExtractor], needs_path: bool = False,
                               help: str = "") -> None:
    """Make ``kind`` (or ``kind:<path>`` when ``needs_path``) a valid ``--feature-extractor`` value."""
    if ":" in kind or kind == "auto":
        raise ValueError(f"feature extractor kind {kind!r} may not contain ':' or be 'auto'")
    _REGISTRY[kind] = ExtractorEntry(build, needs_path, help)


def available_feature_extractors() -> list[str]:
    """The accepted spellings, e.g. ``['domain', 'inception', 'clip:<dir>', 'dinov2:<dir>']``."""
    return [f"{k}:<dir>" if e.needs_path else k for k, e in _REGISTRY.items()]


def resolve_feature_extractor(spec: str | None, inception_weights: str | os.PathLike | None = None) -> str:
    """``auto``/None -> ``inception`` when weights are given (argument or ``$GENACCEL_INCEPTION_WEIGHTS``), else
    ``domain``; any other spec is checked (known kind, path given and existing) and returned unchanged."""
    if spec in (None, "", "auto"):
        from genaccel.eval.inception import WEIGHTS_ENV

        return "inception" if (inception_weights or os.environ.get(WEIGHTS_ENV)) else "domain"
    parse_feature_extractor(spec)
    return spec


def parse_feature_extractor(spec: str) -> tuple[str, Path | None]:
    """``kind`` or ``kind:<path>`` -> (kind, path); one ValueError naming the problem and the accepted values."""
    kind, sep, path = spec.partition(":")
    choices = ", ".join([*available_feature_extractors(), "auto"])
    if kind not in _REGISTRY:
        raise ValueError(f"unknown feature extractor {spec!r}; choose from {choices}")
    entry = _REGISTRY[kind]
    if not entry.needs_path:
        if sep:
            raise ValueError(f"feature extractor {kind!r} takes no path (got {spec!r}); choose from {choices}")
        return kind, None
    if not path:
        raise ValueError(f"feature extractor {kind!r} needs a local directory: --feature-extractor {kind}:<dir> "
                         f"({entry.help})")
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "has no config.json"
        raise ValueError(f"{kind} weights directory {p} {what}: pass a folder written by transformers' "
                         f"save_pretrained ({entry.help}); nothing is downloaded")
    return kind, p


def build_feature_extractor(spec: str, inception_weights: str | os.PathLike | None = None,
                            classifier_path: str | os.PathLike | None = None,
                            device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor named by ``spec`` (see the module docstring), in eval mode on ``device``."""
    spec = resolve_feature_extractor(spec, inception_weights)
    kind, path = parse_feature_extractor(spec)
    return _REGISTRY[kind].build(path=path, inception_weights=inception_weights, classifier_path=classifier_path,
                                 device=torch.device(device))


def _build_domain(path, inception_weights, classifier_path, device) -> FeatureExtractor:
    from genaccel.eval.feature_extractor import load_feature_extractor

    clf = load_feature_extractor(classifier_path, device)
    return FeatureExtractor("domain", "domain", clf.feature_dim,
                            f"domain: crop classifier ({clf.feature_dim}-d pooled features)",
                            lambda x: clf.features(x), path=str(classifier_path) if classifier_path else None)


def _build_inception(path, inception_weights, classifier_path, device) -> FeatureExtractor:
    from genaccel.eval.inception import inception_features, load_inception, resolve_weights

    model = load_inception(inception_weights, device)
    return FeatureExtractor("inception", "inception", 2048,
                            "inception: torch-fidelity inception-v3-compat pool (2048-d, TF1 bilinear resize)",
                            lambda x: inception_features(model, x, len(x), progress=False).pool,
                            path=str(resolve_weights(inception_weights)))


def _hf_preprocess(path: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers import AutoImageProcessor

    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"{path} has no preprocessor_config.json: save the model's image processor there too "
                         "(processor.save_pretrained(dir)), so images are resized and normalised as in training")
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return lambda x: processor(images=list(x.numpy()), return_tensors="pt")["pixel_values"].to(device)


def _load_hf_model(path: Path, device: torch.device, kind: str):
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} cannot be loaded as a {kind} model by transformers: {first[:200]}") from e
    return model.to(device).eval()


def _build_clip(path, inception_weights, classifier_path, device) -> FeatureExtractor:
    model = _load_hf_model(path, device, "CLIP")
    if not (hasattr(model, "vision_model") and hasattr(model, "visual_projection")):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a CLIP model with an image tower and "
                         "projection (CLIPModel or CLIPVisionModelWithProjection)")
    preprocess = _hf_preprocess(path, device)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.visual_projection(model.vision_model(pixel_values=preprocess(x)).pooler_output)

    dim = int(model.visual_projection.out_features)
    return FeatureExtractor("clip", "clip", dim, f"clip: {path.name} projected image embedding ({dim}-d)",
                            embed, path=str(path.resolve()))


def _build_dinov2(path, inception_weights, classifier_path, device) -> FeatureExtractor:
    model = _load_hf_model(path, device, "DINOv2")
    if getattr(model.config, "model_type", None) != "dinov2":
        raise ValueError(f"{path} holds a {getattr(model.config, 'model_type', type(model).__name__)} model, "
                         "not DINOv2 (config model_type 'dinov2')")
    preprocess = _hf_preprocess(path, device)
    dim = int(model.config.hidden_size)
    return FeatureExtractor("dinov2", "dinov2", dim, f"dinov2: {path.name} CLS token after layer norm ({dim}-d)",
                            lambda x: model(pixel_values=preprocess(x)).pooler_output, path=str(path.resolve()))


register_feature_extractor("domain", _build_domain, help="the bundled crop classifier")
register_feature_extractor("inception", _build_inception, help="torch-fidelity InceptionV3 from --inception-weights")
register_feature_extractor("clip", _build_clip, needs_path=True,
                           help="e.g. CLIPModel.from_pretrained(...).save_pretrained(dir) plus its CLIPImageProcessor")
register_feature_extractor("dinov2", _build_dinov2, needs_path=True,
                           help="e.g. a Dinov2Model saved with save_pretrained plus its image processor")


__all__ = ["FeatureExtractor", "available_feature_extractors", "build_feature_extractor", "parse_feature_extractor",
           "register_feature_extractor", "resolve_feature_extractor"]
