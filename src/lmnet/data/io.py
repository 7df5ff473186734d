"""Reading images and masks of any common format, bit depth and colour mode."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "read_array", "read_mask", "binarize_mask", "list_images", "read_image",
           "to_uint8_channels"]

#: File suffixes treated as images (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


def read_array(path: str | Path) -> np.ndarray:
    """Pixel array ``(H, W)`` or ``(H, W, C)`` of an image file, in its own dtype.

    Pillow reads most files; TIFFs Pillow refuses (e.g. RGB tagged BlackIsZero, as in CVC-ClinicDB)
    go through ``tifffile``. Raises ``ValueError`` naming the file when nothing can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode == "1":
                return np.asarray(im.convert("L"))
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as pil_error:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                import tifffile

                return np.asarray(tifffile.imread(path))
            except Exception as tiff_error:  # noqa: BLE001 - report both readers' reasons
                raise ValueError(f"cannot read {path}: {pil_error}; tifffile: {tiff_error}") from None
        raise ValueError(f"cannot read {path}: {pil_error}") from None


def binarize_mask(arr: np.ndarray) -> np.ndarray:
    """Any mask array as ``bool`` ``(H, W)``, lesion = True.

    Colour masks are reduced to their brightest channel (alpha ignored). Masks whose values are
    only 0 and 1 are used as they are; anything else (JPEG masks with values near 0 and 255,
    16-bit masks, soft edges) is thresholded at half of its dtype's range (128 for 8-bit).
    """
    a = np.asarray(arr)
    if a.ndim == 3:
        channels = a.shape[2]
        if channels in (2, 4):  # drop alpha
            a = a[..., : channels - 1]
        a = a.max(axis=2)
    if a.ndim != 2:
        raise ValueError(f"a mask must be a 2-D image, got shape {arr.shape}")
    if a.dtype == bool:
        return a
    if np.isin(np.unique(a), (0, 1)).all():
        return a.astype(bool)
    if np.issubdtype(a.dtype, np.integer):
        half = (np.iinfo(a.dtype).max + 1) / 2
    else:
        half = 0.5 if float(a.max()) <= 1.0 else 127.5
    return a >= half


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as ``bool`` ``(H, W)``; see :func:`binarize_mask`."""
    try:
        return binarize_mask(read_array(path))
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted), by suffix; hidden files are skipped."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def to_uint8_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """An image array as ``uint8`` ``(H, W, channels)``.

    16-bit and float images are rescaled to 0..255; grey images are repeated to 3 channels and colour
    images averaged to 1 channel when ``channels`` asks for it; an alpha channel is dropped.
    """
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer):
            a = (a.astype(np.float64) * (255.0 / np.iinfo(a.dtype).max)).round().astype(np.uint8)
        else:
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            scale = 255.0 if lo >= 0 and hi <= 1 else 255.0 / max(hi - lo, 1e-12)
            a = ((a - (0 if lo >= 0 and hi <= 1 else lo)) * scale).clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected a 2-D image, got an array of shape {arr.shape}")
    if a.shape[2] in (2, 4):
        a = a[..., : a.shape[2] - 1]
    c = a.shape[2]
    if c == channels:
        return np.ascontiguousarray(a)
    if c == 1:
        return np.repeat(a, channels, axis=2)
    if channels == 1:
        return a.mean(axis=2, keepdims=True).round().astype(np.uint8)
    raise ValueError(f"cannot turn a {c}-channel image into {channels} channels")


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read an image as ``uint8`` ``(H, W, channels)``; see :func:`to_uint8_channels`."""
    try:
        return to_uint8_channels(read_array(path), channels)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None
