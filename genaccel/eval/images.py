"""Image sets on disk: ADM-format ``.npz`` sample batches and image folders, with input checks.

ADM / guided-diffusion convention: key ``arr_0`` holds uint8 NHWC images; class-conditional batches add
``arr_1`` with the labels. Files are written uncompressed (``np.savez``) so the ADM evaluator can stream
them, and atomically (temp file + rename).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
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


@dataclass
class ImageSource:
    """An image set read in batches of uint8 NHWC arrays, so that feature extraction never holds the whole set.

    50,000 256x256 samples are 9.8 GB as one array; streamed, only ``batch_size`` images are in memory. Build
    one with :func:`open_images` (an ADM ``.npz``, a folder, or an array already in memory)."""

    name: str
    num_images: int
    image_shape: tuple[int, int, int]
    _array: np.ndarray | None = None
    _npz: Path | None = None
    _files: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return self.num_images

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive batches of at most ``batch_size`` images, in file order."""
        if self._array is not None:
            for i in range(0, self.num_images, batch_size):
                yield self._array[i:i + batch_size]
        elif self._npz is not None:
            yield from _stream_npz(self._npz, "arr_0", batch_size)
        else:
            for i in range(0, self.num_images, batch_size):
                yield np.stack([_read_image(f) for f in self._files[i:i + batch_size]])


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    return read(member)


def _npz_member(path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    with zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise ValueError(f"{path} has no '{key}' (keys: {[n[:-4] for n in zf.namelist()]})")
        with zf.open(f"{key}.npy") as member:
            return _npy_header(member)


def _stream_npz(path: Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of ``key`` read straight from the zip member (as ADM's ``StreamingNpzArrayReader``)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
        shape, fortran, dtype = _npy_header(member)
        if fortran:  # not streamable row by row; rare for image batches
            member.close()
            with np.load(path) as z:
                arr = z[key]
            for i in range(0, shape[0], batch_size):
                yield arr[i:i + batch_size]
            return
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for i in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - i)
            data = member.read(n * row)
            if len(data) != n * row:
                raise ValueError(f"{path}: '{key}' is truncated (expected {shape[0]} rows, file ends in row {i})")
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(n, *shape[1:])  # writable copy


def open_images(source: str | os.PathLike | np.ndarray) -> ImageSource:
    """An :class:`ImageSource` over an ADM ``.npz`` (``arr_0``, streamed), a folder of same-size images, or a
    uint8 NHWC array; the same input checks as :func:`load_images`, without reading the pixels."""
    if isinstance(source, np.ndarray):
        images = check_images(source, "images")
        return ImageSource("array", len(images), tuple(images.shape[1:]), _array=images)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{path} contains no images ({', '.join(IMAGE_EXTS)}); point to a folder of samples")
        first = _read_image(files[0])
        return ImageSource(str(path), len(files), tuple(first.shape), _files=files)
    if not path.is_file():
        raise FileNotFoundError(f"image set not found: {path} (expected an ADM .npz or a folder of images)")
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected an ADM .npz (key 'arr_0') or a folder of images")
    shape, _, dtype = _npz_member(path, "arr_0")
    check_images(np.empty((min(shape[0], 1), *shape[1:]) if shape else (), dtype=dtype), str(path))
    return ImageSource(str(path), int(shape[0]), tuple(shape[1:]), _npz=path)


def npz_keys(path: str | os.PathLike) -> list[str]:
    with np.load(path) as z:
        return list(z.files)


__all__ = ["ImageSource", "check_images", "load_folder_images", "load_images", "load_npz_images", "npz_keys",
           "open_images", "save_adm_npz"]
