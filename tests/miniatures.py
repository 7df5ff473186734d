"""Faithful miniatures of the datasets lmnet reads, written by the tests themselves.

Each copies what matters of the real download: folder and file names, formats, colour modes and
bit depths, the quirks (JPEG masks, BUSI's 1-bit and RGBA masks and several masks per image, LGG's
patient folders of TIFF slices, CVC-ClinicDB's RGB TIFFs that Pillow refuses), at a few images
of small size. The real sets, where present in ``../shared/datasets``, are checked against the
same expectations in ``tests/test_real_datasets.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

__all__ = ["make_kvasir", "make_busi", "make_lgg", "make_cvc", "blob"]


def blob(h: int, w: int, rng: np.random.Generator, scale: float = 0.25) -> np.ndarray:
    """A filled ellipse somewhere inside an ``h`` x ``w`` frame, ``bool``."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.5, 1.0) * scale * h, rng.uniform(0.5, 1.0) * scale * w
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def _photo(mask: np.ndarray, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    h, w = mask.shape
    img = rng.normal(90, 25, (h, w, channels))
    img[mask] += 90
    out = img.clip(0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def make_kvasir(root: Path, n: int = 12, seed: int = 0) -> Path:
    """``images/<id>.jpg`` (RGB, sizes differ) + ``masks/<id>.jpg`` (JPEG: values near 0 and 255)
    + ``kavsir_bboxes.json``, as in kvasir-seg.zip."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    boxes = {}
    for i in range(n):
        h, w = int(rng.integers(56, 96)), int(rng.integers(64, 112))
        m = blob(h, w, rng)
        name = f"cju{i:04d}kvasir{seed}"
        Image.fromarray(_photo(m, rng)).save(root / "images" / f"{name}.jpg", quality=90)
        Image.fromarray(np.repeat((m * 255).astype(np.uint8)[..., None], 3, 2)).save(
            root / "masks" / f"{name}.jpg", quality=75)
        ys, xs = np.nonzero(m)
        boxes[name] = {"height": h, "width": w, "bbox": [{"label": "polyp", "xmin": int(xs.min()),
                       "ymin": int(ys.min()), "xmax": int(xs.max()), "ymax": int(ys.max())}]}
    (root / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return root


#: Images per BUSI class in the miniature, and which benign case has a second mask.
BUSI_COUNTS = {"benign": 10, "malignant": 5, "normal": 5}


def make_busi(root: Path, seed: int = 0) -> Path:
    """``benign/``, ``malignant/``, ``normal/`` with ``<class> (n).png`` (greyscale saved as RGB),
    ``<class> (n)_mask.png`` as 1-bit (mode "1") or RGB; benign (2) has a second mask
    ``_mask_1.png`` in RGBA with an opaque alpha; normal masks are empty."""
    rng = np.random.default_rng(seed)
    for cls, count in BUSI_COUNTS.items():
        (root / cls).mkdir(parents=True)
        for i in range(1, count + 1):
            h, w = int(rng.integers(60, 90)), int(rng.integers(70, 100))
            m = blob(h, w, rng) if cls != "normal" else np.zeros((h, w), bool)
            grey = _photo(m, rng, 1)
            Image.fromarray(np.repeat(grey[..., None], 3, 2)).save(root / cls / f"{cls} ({i}).png")
            mask_path = root / cls / f"{cls} ({i})_mask.png"
            if i % 2:
                Image.fromarray(m).convert("1").save(mask_path)
            else:
                Image.fromarray(np.repeat((m * 255).astype(np.uint8)[..., None], 3, 2)).save(mask_path)
            if cls == "benign" and i == 2:
                second = blob(h, w, rng, 0.12) & ~m
                rgba = np.zeros((h, w, 4), np.uint8)
                rgba[..., :3] = (second * 255)[..., None]
                rgba[..., 3] = 255
                Image.fromarray(rgba, "RGBA").save(root / cls / f"{cls} ({i})_mask_1.png")
    return root


#: Patients and slices per patient in the LGG miniature.
LGG_PATIENTS, LGG_SLICES = 4, 5


def make_lgg(root: Path, seed: int = 0) -> Path:
    """``kaggle_3m/<patient>/<patient>_<n>.tif`` (3-channel 8-bit) + ``<patient>_<n>_mask.tif``
    (0/255), a ``data.csv`` and a README, as in the Kaggle download; some slices have no lesion."""
    rng = np.random.default_rng(seed)
    base = root / "kaggle_3m"
    base.mkdir(parents=True)
    rows = ["Patient,grade"]
    for p in range(LGG_PATIENTS):
        patient = f"TCGA_CS_{4941 + p}_1997022{p}"
        (base / patient).mkdir()
        rows.append(f"{patient[:12]},{1 + p % 2}")
        for n in range(1, LGG_SLICES + 1):
            m = blob(64, 64, rng, 0.2) if n % 3 else np.zeros((64, 64), bool)
            tifffile.imwrite(base / patient / f"{patient}_{n}.tif", _photo(m, rng))
            tifffile.imwrite(base / patient / f"{patient}_{n}_mask.tif", (m * 255).astype(np.uint8))
    (base / "data.csv").write_text("\n".join(rows) + "\n")
    (base / "README.md").write_text("LGG segmentation miniature\n")
    return root


def make_cvc(root: Path, n: int = 3, seed: int = 0) -> Path:
    """CVC-ClinicDB as distributed: ``Original/<n>.tif`` RGB TIFFs tagged BlackIsZero (Pillow refuses
    them) and ``Ground Truth/<n>.tif`` 8-bit masks with soft edges."""
    rng = np.random.default_rng(seed)
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    for i in range(1, n + 1):
        m = blob(72, 96, rng)
        tifffile.imwrite(root / "Original" / f"{i}.tif", _photo(m, rng), photometric="minisblack",
                         planarconfig="contig")
        soft = (m * 255).astype(np.uint8)
        soft[1:-1, 1:-1][m[1:-1, 1:-1] != m[2:, 1:-1]] = 128  # an edge of in-between values
        tifffile.imwrite(root / "Ground Truth" / f"{i}.tif", soft)
    return root


def make_discs(root: Path, n: int = 16, seed: int = 0) -> Path:
    """A generic-layout dataset of bright discs on noise, images of mixed sizes (48-96 px)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        yy, xx = np.mgrid[:h, :w]
        cy, cx, r = rng.integers(12, h - 12), rng.integers(12, w - 12), rng.integers(6, 12)
        mask = np.hypot(yy - cy, xx - cx) < r
        img = rng.normal(60, 20, (h, w, 3))
        img[mask] += 120
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"case{i:02d}.png")
    return root
