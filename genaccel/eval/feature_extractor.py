"""A small CNN classifier on the bundled 64x64 crops; its penultimate features define FD-domain.

Inception weights cannot be downloaded here, so the Fréchet distance we report by default is computed on
the pooled features of this classifier, trained on the bundled skimage crops
(:mod:`genaccel.data.skimage_crops`). It is always labelled **FD-domain**, never FID: the numbers are
not comparable with FID values in papers.

Inputs are either uint8 images (N, H, W, 3) as produced by :meth:`ImagePipeline.decode` / stored in ADM
``.npz`` files, or float images (N, 3, H, W) in [-1, 1] as produced by ``make_crops``. Both are resized to
64x64 when needed (bilinear, antialiased).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSET = Path(__file__).resolve().parent.parent / "assets" / "crop_classifier.safetensors"
INPUT_SIZE = 64


@dataclass
class ClassifierConfig:
    """Architecture of :class:`CropClassifier` (stored as JSON in the safetensors metadata key 'config')."""

    num_classes: int = 16
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])
    dropout: float = 0.1

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] -> float (N, 3, 64, 64) in [-1, 1].

    Raises ValueError for anything else (wrong rank, channel count or dtype range) so that a swapped
    layout never silently produces features.
    """
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images with 4 dims, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC with 3 channels, got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    elif images.is_floating_point():
        if images.shape[1] != 3:
            raise ValueError(f"float images must be NCHW with 3 channels in [-1, 1], got shape {tuple(images.shape)}")
        x = images.float()
    else:
        raise ValueError(f"images must be uint8 (NHWC) or float in [-1, 1] (NCHW), got dtype {images.dtype}")
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


class CropClassifier(nn.Module):
    """Four conv-BN-ReLU stages, global average pooling (the features), dropout, linear head."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        c = self.config
        if len(c.widths) != len(c.strides):
            raise ValueError(f"widths {c.widths} and strides {c.strides} must have the same length")
        chans = [3] + list(c.widths)
        self.body = nn.Sequential(*[conv_bn_relu(chans[i], chans[i + 1], s) for i, s in enumerate(c.strides)])
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float (N, 3, 64, 64) in [-1, 1] -> logits (training path; no input conversion)."""
        return self.head(self.dropout(self.pool(x)))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate (pooled) features (N, feature_dim) in float32 for uint8 NHWC or float NCHW images."""
        return self._batched(images, self.pool, batch_size)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Class logits (N, num_classes) for uint8 NHWC or float NCHW images."""
        return self._batched(images, lambda x: self.head(self.pool(x)), batch_size)

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids (N,)."""
        return self.logits(images, batch_size).argmax(-1)

    def _batched(self, images: torch.Tensor, fn, batch_size: int) -> torch.Tensor:
        if self.training:
            raise RuntimeError("call .eval() before extracting features: BatchNorm/dropout are in training mode")
        if len(images) == 0:
            raise ValueError("no images given")
        outs = [fn(to_model_input(chunk).to(self.device)).float().cpu() for chunk in torch.as_tensor(images).split(batch_size)]
        return torch.cat(outs)


def classifier_metadata(config: ClassifierConfig, **extra: str) -> dict[str, str]:
    """Safetensors metadata: the architecture under 'config' (JSON), plus free-form string fields."""
    return {"config": json.dumps(asdict(config)), **extra}


def load_feature_extractor(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> CropClassifier:
    """The bundled crop classifier (or the one at ``path``) in eval mode.

    Raises FileNotFoundError naming the file and the recipe that regenerates it when it is missing.
    """
    from genaccel.models.loading import config_from_metadata, load_strict, read_state_dict

    path = Path(path) if path else ASSET
    if not path.is_file():
        raise FileNotFoundError(
            f"crop classifier weights not found: {path}. Train them with "
            "`python -m genaccel.train classifier --config configs/train/classifier.yaml` and copy "
            "checkpoints/classifier/crop_classifier.safetensors there, or pass the path explicitly"
        )
    sd, meta = read_state_dict(path)
    config = config_from_metadata(meta)
    if config is None:
        raise ValueError(f"{path} has no 'config' entry in its safetensors metadata: not a genaccel crop classifier")
    model = CropClassifier(ClassifierConfig(**config))
    load_strict(model, sd, str(path))
    return model.to(device).eval()


__all__ = ["ASSET", "ClassifierConfig", "CropClassifier", "classifier_metadata", "load_feature_extractor",
           "to_model_input"]
