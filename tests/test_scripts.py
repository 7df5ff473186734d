"""The helper scripts under ``scripts/`` (packing Kvasir-SEG for a lent GPU machine)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from lmnet.data.io import read_mask
from lmnet.data.layouts import discover
from lmnet.data.splits import make_split
from tests.conftest import ROOT

SAMPLE = ROOT / "src" / "lmnet" / "sample_data" / "kvasir_sample"


def test_pack_kvasir_keeps_images_masks_and_split(tmp_path):
    out = tmp_path / "packed"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "pack_kvasir_for_device.py"),
                    str(SAMPLE), str(out)], check=True, capture_output=True)
    _, original, _ = discover(SAMPLE, "kvasir")
    _, packed, _ = discover(out, "kvasir")
    assert [s.name for s in packed] == [s.name for s in original]
    for a, b in zip(original, packed):
        assert b.image.read_bytes() == a.image.read_bytes()
        assert b.masks[0].suffix == ".png"
        assert np.array_equal(read_mask(b.masks[0]), read_mask(a.masks[0]))
    split_a, split_b = (make_split(s, [0.6, 0.2, 0.2], 0) for s in (original, packed))
    assert all(split_a[k] == split_b[k] for k in ("train", "val", "test"))


def test_device_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device_table1_gpu.sh")], check=True)
