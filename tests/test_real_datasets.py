"""The real data sets in ``../shared/datasets`` (CI has them; a clone does not: these tests then skip,
naming the folder). Every behaviour is also tested on the miniatures of ``tests/miniatures.py``;
here the counts and file quirks of the real downloads are checked against what lmnet expects."""
from __future__ import annotations

import numpy as np
from PIL import Image

from lmnet.cli.main import main
from lmnet.data.dataset import load_sample
from lmnet.data.io import read_array, read_mask
from lmnet.data.layouts import discover
from lmnet.data.splits import SPLITS, make_split
from tests.conftest import real_dataset


def test_kvasir_seg_complete():
    fmt, samples, problems = discover(real_dataset("kvasir-seg"))
    assert fmt == "kvasir" and len(samples) == 1000 and problems == []
    image, mask = load_sample(samples[0])
    assert image.shape[2] == 3 and mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 1}
    raw = read_array(samples[0].masks[0])
    assert len(np.unique(raw)) > 2  # JPEG masks: thresholded, as the miniature's


def test_busi_subset():
    root = real_dataset("busi")
    fmt, samples, problems = discover(root)
    assert fmt == "busi" and len(samples) == 340 and problems == []
    assert {g: sum(s.group == g for s in samples) for g in ("benign", "malignant", "normal")} == \
        {"benign": 190, "malignant": 90, "normal": 60}
    assert sum(len(s.masks) > 1 for s in samples) == 353 - 340
    assert Image.open(root / "benign" / "benign (1)_mask.png").mode == "1"
    assert Image.open(root / "benign" / "benign (4)_mask_1.png").mode == "RGBA"
    assert 0 < read_mask(root / "benign" / "benign (4)_mask_1.png").mean() < 0.1
    assert not read_mask(root / "normal" / "normal (1)_mask.png").any()
    assert [len(make_split(samples, seed=3)[k]) for k in SPLITS] == [272, 34, 34]


def test_lgg_subset(capsys):
    root = real_dataset("lgg")
    fmt, samples, problems = discover(root)
    assert fmt == "lgg" and len(samples) == 192 and problems == []
    assert len({s.patient for s in samples}) == 8
    assert main(["check-data", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "format lgg, 192 images" in out and "suspicious masks: 0" in out and "problems: 0" in out
