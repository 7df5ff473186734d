"""Copy Kvasir-SEG into a folder small enough to travel to a lent GPU machine (64 MiB limit).

Images are copied byte for byte; each mask is written as a 0/255 PNG of what lmnet reads from
the original JPEG mask (:func:`lmnet.data.read_mask`), so training and evaluation see the same
images and the same masks, and the split (by file stem) is the same.

    python scripts/pack_kvasir_for_device.py ../shared/datasets/kvasir-seg .gpudata/kvasir-seg
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lmnet.data import list_images, read_mask


def main(src: str, dst: str) -> int:
    s, d = Path(src), Path(dst)
    if not ((s / "images").is_dir() and (s / "masks").is_dir()):
        raise SystemExit(f"{s} is not a Kvasir-SEG folder (it needs images/ and masks/)")
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "masks").mkdir(parents=True, exist_ok=True)
    images, masks = list_images(s / "images"), list_images(s / "masks")
    for p in images:
        shutil.copy2(p, d / "images" / p.name)
    for p in masks:
        m = read_mask(p)
        out = d / "masks" / f"{p.stem}.png"
        Image.fromarray(m.astype(np.uint8) * 255).save(out, optimize=True)
        if not np.array_equal(read_mask(out), m):
            raise SystemExit(f"{out} does not read back as {p}")
    print(f"{len(images)} images, {len(masks)} masks -> {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
