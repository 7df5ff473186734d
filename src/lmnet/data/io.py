"""Reading images and masks of any common format, bit depth and colour mode."""
from __future__ import annotations

import functools
import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "read_array", "read_image_bytes", "read_mask", "binarize_mask", "label_map_values",
           "mask_findings", "list_images", "warn_label_maps", "read_image", "to_uint8_channels", "significant_bits"]

log = logging.getLogger(__name__)

#: Colour modes converted to RGB when read (Pillow's names): print and scanner colour spaces.
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")
#: Bit depths already said in a note (one line per depth and process, not one per image).
_noted_depths: set[tuple[str, int]] = set()

#: File suffixes treated as images (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


def read_array(path: str | Path | io.BytesIO, name: str | None = None) -> np.ndarray:
    """Pixel array ``(H, W)`` or ``(H, W, C)`` of an image file, in its own dtype.

    Pillow reads most files; TIFFs Pillow refuses (e.g. RGB tagged BlackIsZero, as in CVC-ClinicDB)
    go through ``tifffile``. The EXIF orientation tag is applied, so the array is upright as an
    image viewer shows it (phone and camera JPEGs store it rotated). CMYK (and YCCK JPEGs, which
    Pillow reads as CMYK), YCbCr, LAB and HSV images are converted to RGB, through their embedded
    ICC profile where they carry one. An image over Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) is refused. Raises ``ValueError`` naming the file when
    nothing can read it. ``path`` may also be an in-memory file (``io.BytesIO``), named ``name``
    in the messages.
    """
    if not isinstance(path, io.BytesIO):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    source, path = path, Path(name) if name else path  # what is read; what the messages call it
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "1":
                return np.asarray(im.convert("L"))
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in _TO_RGB:
                im = _to_rgb(im)
            return np.asarray(im)
    except Image.DecompressionBombError as err:
        raise ValueError(f"cannot read {path}: {err} (a 2-D medical image this large is "
                         "almost certainly a mistake; downscale it first)") from None
    except (UnidentifiedImageError, OSError, ValueError) as pil_error:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                import tifffile

                if isinstance(source, io.BytesIO):
                    source.seek(0)
                return np.asarray(tifffile.imread(source))
            except Exception as tiff_error:  # noqa: BLE001 - report both readers' reasons
                raise ValueError(f"cannot read {path}: {pil_error}; tifffile: {tiff_error}") from None
        raise ValueError(f"cannot read {path}: {pil_error}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """An image of a print or scanner colour mode as RGB: through its ICC profile if it has one."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            import io

            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to Pillow's conversion
            pass
    return im.convert("RGB")


def _mask_plane(arr: np.ndarray) -> np.ndarray:
    """The one plane of a mask array that carries the lesion (see :func:`binarize_mask`)."""
    a = np.asarray(arr)
    if a.ndim == 3:
        channels = a.shape[2]
        colour, alpha = (a[..., : channels - 1], a[..., -1]) if channels in (2, 4) else (a, None)
        # the brightest channel, one whole plane at a time: numpy's max over a short last axis
        # runs pixel by pixel (11 ms for a Kvasir-SEG mask against 0.5 ms)
        colour = functools.reduce(np.maximum, (colour[..., c] for c in range(colour.shape[2])))
        if alpha is not None and colour.min() == colour.max() and alpha.min() != alpha.max():
            return alpha  # a uniform colour drawn through a shaped alpha: the alpha is the mask
        a = colour
    if a.ndim != 2:
        raise ValueError(f"a mask must be a 2-D image, got shape {arr.shape}")
    return a


def _values(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``a``, as ``np.unique``; 8- and 16-bit masks by counting
    (one pass, no sort: a few times faster on a whole mask)."""
    if a.dtype in (np.uint8, np.uint16) and a.size:
        return np.flatnonzero(np.bincount(a.ravel())).astype(a.dtype)
    return np.unique(a)


def _threshold(a: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """The rules of :func:`binarize_mask` on a plane (``values``: its :func:`_values`, if known)."""
    if a.dtype == bool:
        return a
    values = _values(a) if values is None else values
    if np.isin(values, (0, 1)).all():  # 0/1 masks, including all-1 (lesion everywhere)
        return a.astype(bool)
    if len(values) <= 2 and values[0] == 0:  # {0}, {0, v}: v is lesion, whatever its value
        return a > 0
    if len(values) == 1:  # one non-zero value everywhere: all lesion only if it is bright
        values = np.array([0, values[0]])
    if np.issubdtype(a.dtype, np.integer):
        top = 255 if values[-1] <= 255 else np.iinfo(a.dtype).max
        return a >= (top + 1) / 2
    return a >= (0.5 if float(values[-1]) <= 1.0 else 127.5)


def binarize_mask(arr: np.ndarray) -> np.ndarray:
    """Any mask array as ``bool`` ``(H, W)``, lesion = True. The rules, in order:

    - colour masks are reduced to their brightest channel; an alpha channel is ignored unless
      the colour is the same everywhere and only the alpha varies (a shape drawn in alpha), in which
      case the alpha is the mask;
    - a mask with two values, 0 and any ``v`` (0/1, 0/255, 0/65535, or 0/255 stored in 16 bits),
      is lesion where it is ``v``;
    - anything else (JPEG masks with values near 0 and 255, soft edges) is thresholded at half of
      the 8-bit range when its values fit in 8 bits (128), else at half of its dtype's range;
      floats at 0.5 (values within 0..1) or 127.5.
    """
    return _binarize_plane(_mask_plane(arr))


def _binarize_plane(a: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """:func:`binarize_mask` of a plane :func:`_mask_plane` returned (``values``: its
    :func:`_values`, if known)."""
    if a.dtype.kind in "if" and a.size and a.min() < 0:  # unsigned: never negative
        raise ValueError(f"a mask has negative values (min {a.min()})")
    return _threshold(a, values)


def label_map_values(arr: np.ndarray) -> list[int] | None:
    """The values of a mask that looks like a label map (three or more small whole numbers, such
    as 0/1/2 for background, lesion and another structure), else None. lmnet segments one lesion
    class; such a mask is read by the rules of :func:`binarize_mask` (0/1/2: empty), so the
    commands that read masks warn about it."""
    return _label_values(_mask_plane(arr))


def _label_values(plane: np.ndarray, values: np.ndarray | None = None) -> list[int] | None:
    """:func:`label_map_values` of a plane :func:`_mask_plane` returned (``values``: its
    :func:`_values`, if known)."""
    if plane.dtype == bool or not np.issubdtype(plane.dtype, np.integer):
        return None
    values = _values(plane) if values is None else values
    if 3 <= len(values) <= 32 and values[0] >= 0 and values[-1] <= 63:
        return [int(v) for v in values]
    return None


def mask_findings(arr: np.ndarray, values: np.ndarray | None = None) -> list[str]:
    """What looks wrong about a mask array (empty list: nothing); used by ``lmnet check-data``.

    Flags: non-zero values that the rules of :func:`binarize_mask` turn into an empty mask (a
    label map 0/1/2, 0/255 misread), a mask that is lesion everywhere, and more than 5 % of
    pixels far from both background and lesion values (a photo or probability map saved as a mask;
    JPEG noise and soft edges stay well below that). ``values``: the :func:`_values` of its
    plane, if known.
    """
    plane = _mask_plane(arr)
    if values is None and plane.dtype != bool:
        values = _values(plane)
    binary = _threshold(plane, values)
    found = []
    labels = _label_values(plane, values)
    if labels is not None:
        found.append(f"a label map with values {', '.join(map(str, labels[:8]))}: lmnet reads one "
                     "lesion class (values >= 128 here); merge the labels into 0/255 first")
    if not binary.any() and plane.any():
        found.append(f"non-zero values (max {plane.max()}) but empty after thresholding")
    if binary.all():
        found.append("lesion everywhere (all foreground)")
    top = float(plane.max()) if plane.dtype != bool else 1.0
    if top > 0 and labels is None:
        rel = plane.astype(np.float64) / top
        middle = float(((rel > 0.25) & (rel < 0.75)).mean())
        if middle > 0.05:
            found.append(f"{middle:.0%} of pixels are neither background nor lesion "
                         f"(values {', '.join(map(str, values[:5]))}...)")
    return found


def read_mask(path: str | Path, label_maps: list[Path] | None = None,
              findings: dict[Path, list[str]] | None = None) -> np.ndarray:
    """Read a mask file as ``bool`` ``(H, W)``; see :func:`binarize_mask`. ``label_maps``: a list
    that gets ``path`` when the mask looks like a label map (:func:`label_map_values`), so the
    caller can warn. ``findings``: a mapping that gets ``path``'s :func:`mask_findings`, if any
    (``lmnet check-data``; the file is read once for both)."""
    try:
        plane = _mask_plane(read_array(path))  # plane and values once, for every question
        values = None if plane.dtype == bool else _values(plane)
        if label_maps is not None and _label_values(plane, values) is not None:
            label_maps.append(Path(path))
        if findings is not None:
            found = mask_findings(plane, values)
            if found:
                findings[Path(path)] = found
        return _binarize_plane(plane, values)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None


def warn_label_maps(label_maps: list[Path], total: int, what: str = "masks") -> None:
    """One warning line for the label-map masks :func:`read_mask` found, if any."""
    if not label_maps:
        return
    values = label_map_values(read_array(label_maps[0])) or []
    log.warning("warning: %d of %d %s look like label maps (e.g. %s, values %s): lmnet reads one "
                "lesion class, so labels 1, 2, ... below 128 count as background; merge them "
                "into 0/255 masks first (lmnet check-data lists them)", len(label_maps), total,
                what, label_maps[0], ", ".join(map(str, values[:8])))


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


def significant_bits(arr: np.ndarray) -> int:
    """The bit depth an integer image's values actually use (at least 8): 12 for a 16-bit PNG
    holding 12-bit data (values up to 4095), 16 for full 16-bit data."""
    top = int(np.max(arr)) if arr.size else 0
    return max(8, math.ceil(math.log2(top + 1)) if top > 0 else 8)


def to_uint8_channels(arr: np.ndarray, channels: int, source: str | Path | None = None
                      ) -> np.ndarray:
    """An image array as ``uint8`` ``(H, W, channels)``.

    Integer images of more than 8 bits are scaled by the bit depth their values actually use
    (:func:`significant_bits`: 12-bit data in a 16-bit file reads as its 8-bit version would,
    not nearly black), with a one-line note per depth; signed images with negative values and
    float images are scaled by their range (floats within 0..1 by 255); grey images are
    repeated to 3 channels and colour images averaged to 1 channel when ``channels`` asks for
    it; an alpha channel is dropped.
    """
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer) and a.size and a.min() < 0:
            lo, hi = float(a.min()), float(a.max())
            a = ((a.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1.0))).round().astype(np.uint8)
            _note(str(a.dtype), 0, source, f"signed values {lo:g}..{hi:g} scaled to 0..255")
        elif np.issubdtype(a.dtype, np.integer):
            bits = significant_bits(a)
            if bits > 8:
                _note(str(arr.dtype), bits, source,
                      f"{np.dtype(arr.dtype).itemsize * 8}-bit image holding {bits}-bit data: "
                      f"scaled by {2**bits - 1}")
            a = (a.astype(np.float64) * (255.0 / (2**bits - 1))).round().clip(0, 255).astype(np.uint8)
        else:
            if a.size and not np.isfinite(a).all():
                raise ValueError("the image holds NaN or infinite values")
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


def _note(dtype: str, bits: int, source: str | Path | None, text: str) -> None:
    """Log ``text`` once per dtype and bit depth in this process."""
    if (dtype, bits) in _noted_depths:
        return
    _noted_depths.add((dtype, bits))
    log.warning("note: %s%s (said once)", f"{source}: " if source else "", text)


def read_image_bytes(data: bytes, channels: int = 3, name: str = "upload") -> np.ndarray:
    """:func:`read_image` of a file's bytes held in memory (nothing is written to disk)."""
    try:
        return to_uint8_channels(read_array(io.BytesIO(data), name), channels, name)
    except ValueError as err:
        if name in str(err):
            raise
        raise ValueError(f"{name}: {err}") from None


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read an image as ``uint8`` ``(H, W, channels)``; see :func:`to_uint8_channels`."""
    try:
        return to_uint8_channels(read_array(path), channels, path)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None
