"""The bundled dataset: 64x64 crops of the photographs scikit-image ships, one class per photo.

No network: only images that ``skimage.data`` loads from the package itself are used. Each photo is
resized so its short side is ``SHORT_SIDE`` pixels, then split in two: held-out crops come from a band of
``HELDOUT_WIDTH`` pixels along one edge, training crops from the rest, with a ``GAP`` between, so a held-out
crop never shares a pixel with a training crop. The band is on the right edge unless ``HELDOUT_SIDE`` names
another edge for a photo whose right band shows content its training part lacks (held-out should measure
generalisation to unseen pixels of the same scene, not to a different scene). Crops are deterministic given a
seed; training crops get horizontal flips and a small scale jitter.

Larger crops (``size`` = 64 * f, f a whole number; 128 for the 128x128 Token-Shuffle model) come from the
same photos resized f times larger (short side ``SHORT_SIDE * f``), with the band, gap and crop all scaled by
f: a 128x128 crop covers the field of view of a 64x64 one at twice the pixels, and its held-out band is the
same part of each photo. Photos whose source is smaller than the resized size (page, coins, clock, chelsea
at f = 2) are upsampled, so their 128x128 crops are softer than the rest.
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
# Edge of the held-out band per photo (default "right"). camera: the right band is only sky, lawn and
# buildings, content the rest barely shows; its left band (coat, sky, a little lawn) overlaps the training
# part more (a classifier probe: 16% vs 0% of held-out camera crops right with the bottom band). cell: the
# right band holds the only bright cell, which a training part without it never sees; the top band is plain
# background like most of the rest.
HELDOUT_SIDE: dict[str, str] = {"camera": "left", "cell": "top"}
SIDES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Region:
    """Half-open pixel box [x0, x1) x [y0, y1) of a resized photo."""

    x0: int
    x1: int
    y0: int
    y1: int


def scale_factor(size: int) -> int:
    """f such that ``size`` = CROP * f; one clear error for any other crop size."""
    if size < CROP or size % CROP:
        raise ValueError(f"crop size must be a multiple of {CROP} (64, 128, ...), got {size}")
    return size // CROP


@cache
def load_photo(name: str, factor: int = 1) -> torch.Tensor:
    """Photo ``name`` as float (3, H, W) in [-1, 1], short side resized to SHORT_SIDE * factor (antialiased)."""
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    img = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    h, w = img.shape[1:]
    scale = SHORT_SIDE * factor / min(h, w)
    size = (round(h * scale), round(w * scale))
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(-1, 1)


def split_regions(width: int, height: int, side: str = "right", factor: int = 1) -> dict[str, Region]:
    """Held-out band of HELDOUT_WIDTH * factor pixels along edge ``side``; training is the rest minus a GAP."""
    w, h, b, g = width, height, HELDOUT_WIDTH * factor, GAP * factor
    if side == "right":
        return {"train": Region(0, w - b - g, 0, h), "heldout": Region(w - b, w, 0, h)}
    if side == "left":
        return {"train": Region(b + g, w, 0, h), "heldout": Region(0, b, 0, h)}
    if side == "bottom":
        return {"train": Region(0, w, 0, h - b - g), "heldout": Region(0, w, h - b, h)}
    if side == "top":
        return {"train": Region(0, w, b + g, h), "heldout": Region(0, w, 0, b)}
    raise ValueError(f"held-out side must be one of {SIDES}, got {side!r}")


def photo_regions(name: str, factor: int = 1) -> dict[str, Region]:
    """Training and held-out regions of photo ``name`` resized ``factor`` times (see HELDOUT_SIDE)."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; the dataset's photos are {PHOTO_NAMES}")
    img = load_photo(name, factor)
    return split_regions(img.shape[2], img.shape[1], HELDOUT_SIDE.get(name, "right"), factor)


def _crop(img: torch.Tensor, region: Region, rng: np.random.Generator, augment: bool, crop: int = CROP) -> torch.Tensor:
    side = crop
    if augment:
        max_side = min(region.x1 - region.x0, region.y1 - region.y0)
        side = int(round(crop * rng.uniform(*SCALE_JITTER)))
        side = min(side, max_side)
    x = int(rng.integers(region.x0, region.x1 - side + 1))
    y = int(rng.integers(region.y0, region.y1 - side + 1))
    patch = img[:, y : y + side, x : x + side]
    if side != crop:
        patch = F.interpolate(patch[None], size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)[0]
    if augment and rng.random() < 0.5:
        patch = patch.flip(-1)
    return patch.clamp(-1, 1)


def make_crops(
    split: str, per_class: int, seed: int = 0, augment: bool | None = None, size: int = CROP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic crops: images (N, 3, size, size) in [-1, 1] and labels (N,), class-major order.

    ``augment`` defaults to True for 'train' and False for 'heldout'. ``size`` 64 * f crops the photos
    resized f times (module docstring); at size 64 the crops are unchanged from before ``size`` existed.
    """
    factor = scale_factor(size)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    augment = (split == "train") if augment is None else augment
    images, labels = [], []
    for label, name in enumerate(PHOTO_NAMES):
        img = load_photo(name, factor)
        region = photo_regions(name, factor)[split]
        rng = np.random.default_rng([seed, label, 0 if split == "train" else 1])
        images += [_crop(img, region, rng, augment, size) for _ in range(per_class)]
        labels += [label] * per_class
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class RandomCropStream:
    """Endless training batches of fresh random crops (for the VQ and the classifier)."""

    def __init__(self, split: str = "train", seed: int = 0, augment: bool = True, crop_size: int = CROP):
        factor = scale_factor(crop_size)
        self.photos = [load_photo(n, factor) for n in PHOTO_NAMES]
        self.regions = [photo_regions(n, factor)[split] for n in PHOTO_NAMES]
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        self.crop_size = crop_size

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.rng.integers(0, len(self.photos), size=size)
        imgs = [_crop(self.photos[c], self.regions[c], self.rng, self.augment, self.crop_size) for c in labels]
        return torch.stack(imgs), torch.from_numpy(labels).long()


NUM_CLASSES = len(PHOTO_NAMES)
