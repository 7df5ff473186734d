"""``lmnet score`` and ``lmnet aggregate`` on real Kvasir-SEG masks (the shipped sample)."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lmnet.cli.main import main
from lmnet.data import read_mask
from lmnet.metrics import SegmentationEvaluator
from tests.conftest import ROOT

#: Four real Kvasir-SEG masks from the sample that ships with the package.
MASKS = sorted((ROOT / "src" / "lmnet" / "sample_data" / "kvasir_sample" / "masks").glob("*.jpg"))[:4]


@pytest.fixture()
def folders(tmp_path):
    """Truth = 4 real Kvasir-SEG masks; predictions = eroded, shifted, empty and perfect copies."""
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    true_dir.mkdir()
    pred_dir.mkdir()
    for i, path in enumerate(MASKS):
        shutil.copy(path, true_dir / path.name)
        m = read_mask(path)
        if i == 0:
            p = ndimage.binary_erosion(m, iterations=5)
        elif i == 1:
            p = np.roll(m, 7, axis=1)
        elif i == 2:
            p = np.zeros_like(m)
        else:
            p = m
        Image.fromarray(p.astype(np.uint8) * 255).save(pred_dir / f"{path.stem}.png")
    return pred_dir, true_dir, tmp_path / "report"


def test_score_writes_all_reports(folders, capsys):
    pred_dir, true_dir, out = folders
    assert main(["score", str(pred_dir), str(true_dir), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| set | n | Accuracy | Precision | Recall | mDice | mIoU | Hd |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    a = metrics["all"]
    assert a["n_images"] == 4 and a["n_pred_empty"] == 1 and a["n_both_present"] == 3
    for key in ("paper_mdice", "paper_miou", "fg_dice_mean", "fg_dice_pooled", "fg_iou_mean",
                "hd_mean", "hd95_mean", "assd_mean", "rad_pooled_percent", "precision_pooled",
                "recall_mean", "accuracy_pooled"):
        assert isinstance(a[key], float), key
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["name"] for r in rows] == sorted(p.stem for p in MASKS)
    # The CSV holds the same numbers as scoring the arrays directly.
    ev = SegmentationEvaluator()
    for r in rows:
        pred = read_mask(pred_dir / f"{r['name']}.png")
        true = read_mask(true_dir / f"{r['name']}.jpg")
        direct = ev.update(pred, true)[0]
        assert float(r["dice"]) == pytest.approx(direct["dice"])
        assert float(r["hd95"]) == pytest.approx(direct["hd95"])
        assert int(r["true_area"]) == true.sum()
    perfect = [r for r in rows if r["name"] == MASKS[3].stem][0]
    assert float(perfect["dice"]) == 1.0 and float(perfect["hd"]) == 0.0
    empty = [r for r in rows if r["name"] == MASKS[2].stem][0]
    assert empty["boundary_case"] == "pred_empty"
    h, w = int(empty["height"]), int(empty["width"])
    assert float(empty["hd"]) == pytest.approx(np.hypot(h, w))
    md = (out / "metrics.md").read_text()
    assert "only the prediction empty" in md


def test_aggregate_over_runs(folders, tmp_path, capsys):
    pred_dir, true_dir, out = folders
    assert main(["score", str(pred_dir), str(true_dir), "--out", str(out), "--quiet"]) == 0
    assert main(["aggregate", str(out), str(out / "metrics.json"),
                 "--out", str(tmp_path / "agg.json")]) == 0
    agg = json.loads((tmp_path / "agg.json").read_text())
    one = json.loads((out / "metrics.json").read_text())["all"]
    assert agg["fg_dice_mean"]["mean"] == pytest.approx(one["fg_dice_mean"])
    assert agg["fg_dice_mean"]["std"] == 0.0 and agg["fg_dice_mean"]["n"] == 2


def test_missing_and_mismatched_files_are_clear_errors(folders, capsys):
    pred_dir, true_dir, out = folders
    (pred_dir / f"{MASKS[0].stem}.png").unlink()
    assert main(["score", str(pred_dir), str(true_dir), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "1 truth masks have no prediction" in err and MASKS[0].stem in err
    assert "Traceback" not in err
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(pred_dir / f"{MASKS[0].stem}.png")
    assert main(["score", str(pred_dir), str(true_dir), "--out", str(out), "--quiet"]) == 2
    assert "must have the size of their truth mask" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "bad_spacing"])
def test_bad_folders(tmp_path, case, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = {"missing_dir": ["score", str(tmp_path / "nope"), str(empty)],
            "empty_dir": ["score", str(empty), str(empty)],
            "bad_spacing": ["score", str(empty), str(empty), "--spacing", "0", "1"]}[case]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
