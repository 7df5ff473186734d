"""A tiny synthetic dataset in the generic layout: bright discs on noise, images of mixed sizes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def make_disc_dataset(root, n: int = 16, seed: int = 0):
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


@pytest.fixture(scope="session")
def disc_data(tmp_path_factory):
    return make_disc_dataset(tmp_path_factory.mktemp("discs") / "data")
