"""The bundled dataset: 64x64 crops of the photographs scikit-image ships, one class per photo.

No network: only images that ``skimage.data`` loads from the package itself are used. Each photo is
resized so its short side is ``SHORT_SIDE`` pixels, then split along its width: training crops come
from the left part, held-out crops from a right band of ``HELDOUT_WIDTH`` pixels, with a ``GAP`` between,
so a held-out crop never shares a pixel with a training crop. Crops are deterministic given a seed;
training crops get horizontal flips and a small scale jitter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

# Photographs only (no synthetic patterns); 'cat' is dropped because it duplicates 'chelsea'.
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "clock", "cell", "page",
)
SHORT_SIDE = 224
HELDOUT_WIDTH = 96
GAP = 8
CROP = 64
SCALE_JITTER = (0.85, 1.2)  # crop side = CROP * s before resizing back to CROP


@dataclass(frozen=True)
class Region:
    """Half-open pixel box [x0, x1) x [y0, y1) of a resized photo."""

    x0: int
    x1: int
    y0: int
    y1: int


@cache
def load_photo(name: str) -> torch.Tensor:
    """Photo ``name`` as float (3, H, W) in [-1, 1], short side resized to SHORT_SIDE (antialiased)."""
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    img = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    h, w = img.shape[1:]
    scale = SHORT_SIDE / min(h, w)
    size = (round(h * scale), round(w * scale))
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(-1, 1)


def split_regions(width: int, height: int) -> dict[str, Region]:
    """Training (left) and held-out (right band) regions, separated by GAP pixels."""
    ho_x0 = width - HELDOUT_WIDTH
    return {"train": Region(0, ho_x0 - GAP, 0, height), "heldout": Region(ho_x0, width, 0, height)}


def _crop(img: torch.Tensor, region: Region, rng: np.random.Generator, augment: bool) -> torch.Tensor:
    side = CROP
    if augment:
        max_side = min(region.x1 - region.x0, region.y1 - region.y0)
        side = int(round(CROP * rng.uniform(*SCALE_JITTER)))
        side = min(side, max_side)
    x = int(rng.integers(region.x0, region.x1 - side + 1))
    y = int(rng.integers(region.y0, region.y1 - side + 1))
    patch = img[:, y : y + side, x : x + side]
    if side != CROP:
        patch = F.interpolate(patch[None], size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)[0]
    if augment and rng.random() < 0.5:
        patch = patch.flip(-1)
    return patch.clamp(-1, 1)


def make_crops(split: str, per_class: int, seed: int = 0, augment: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic crops: images (N, 3, 64, 64) in [-1, 1] and labels (N,), class-major order.

    ``augment`` defaults to True for 'train' and False for 'heldout'.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    augment = (split == "train") if augment is None else augment
    images, labels = [], []
    for label, name in enumerate(PHOTO_NAMES):
        img = load_photo(name)
        region = split_regions(img.shape[2], img.shape[1])[split]
        rng = np.random.default_rng([seed, label, 0 if split == "train" else 1])
        images += [_crop(img, region, rng, augment) for _ in range(per_class)]
        labels += [label] * per_class
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class RandomCropStream:
    """Endless training batches of fresh random crops (for the VQ and the classifier)."""

    def __init__(self, split: str = "train", seed: int = 0, augment: bool = True):
        self.photos = [load_photo(n) for n in PHOTO_NAMES]
        self.regions = [split_regions(p.shape[2], p.shape[1])[split] for p in self.photos]
        self.rng = np.random.default_rng(seed)
        self.augment = augment

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.rng.integers(0, len(self.photos), size=size)
        imgs = [_crop(self.photos[c], self.regions[c], self.rng, self.augment) for c in labels]
        return torch.stack(imgs), torch.from_numpy(labels).long()


NUM_CLASSES = len(PHOTO_NAMES)
