"""Image sets on disk: ADM-format ``.npz`` sample batches and image folders, with input checks.

ADM / guided-diffusion convention: key ``arr_0`` holds uint8 NHWC images; class-conditional batches add
``arr_1`` with the labels. Files are written uncompressed (``np.savez``) so the ADM evaluator can stream
them, and atomically (temp file + rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def check_images(images: np.ndarray, source: str) -> np.ndarray:
    """Raise ValueError unless ``images`` is a non-empty uint8 (N, H, W, 3) array."""
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{source}: images must be NHWC with 3 channels, got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{source}: holds no images")
    return images


def save_adm_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ``arr_0`` (uint8 NHWC) and, if given, ``arr_1`` (int64 labels), uncompressed and atomically."""
    from genaccel.utils.io import atomic_write

    images = check_images(np.asarray(images), str(path))
    arrays = {"arr_0": images}
    if labels is not None:
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object stops numpy from appending '.npz' to the temp name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def load_npz_images(path: str | os.PathLike) -> np.ndarray:
    """``arr_0`` of an ADM-format ``.npz``; raises naming the keys found when ``arr_0`` is absent."""
    path = Path(path)
    with np.load(path) as z:
        if "arr_0" not in z.files:
            raise ValueError(
                f"{path} has keys {z.files} but no 'arr_0': an ADM sample/reference batch stores uint8 NHWC images "
                "under 'arr_0' (a stats-only file needs 'mu' and 'sigma')"
            )
        return check_images(z["arr_0"], str(path))


def load_folder_images(folder: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """All images of a folder (sorted by name, RGB uint8); all must share one size."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"{folder} contains no images ({', '.join(IMAGE_EXTS)}); point to a folder of samples")
    files = files[:limit] if limit else files
    arrays, first = [], None
    for f in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB"))
        if first is None:
            first = (f, arr.shape)
        elif arr.shape != first[1]:
            raise ValueError(
                f"images in {folder} differ in size: {first[0].name} is {first[1][1]}x{first[1][0]} but {f.name} is "
                f"{arr.shape[1]}x{arr.shape[0]}; resize them to one size first"
            )
        arrays.append(arr)
    return np.stack(arrays)


def load_images(path: str | os.PathLike) -> np.ndarray:
    """uint8 NHWC images from an ADM ``.npz`` (``arr_0``) or a folder of image files."""
    path = Path(path)
    if path.is_dir():
        return load_folder_images(path)
    if not path.is_file():
        raise FileNotFoundError(f"image set not found: {path} (expected an ADM .npz or a folder of images)")
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected an ADM .npz (key 'arr_0') or a folder of images")
    return load_npz_images(path)


def npz_keys(path: str | os.PathLike) -> list[str]:
    with np.load(path) as z:
        return list(z.files)


__all__ = ["check_images", "load_folder_images", "load_images", "load_npz_images", "npz_keys", "save_adm_npz"]
