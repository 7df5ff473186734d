"""``lmnet predict`` loses nothing and writes nothing half: an earlier prediction is kept or
replaced on request, ``areas.csv`` always describes the masks on disk, a kill leaves no truncated
PNG, and bad thresholds or output folders are one line (rows of issue 27's table)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmnet.cli.main import main
from lmnet.data.io import read_mask


def _images(folder: Path, n: int, size: tuple[int, int] = (40, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    return folder


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "areas.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _check_consistent(out: Path) -> list[dict[str, str]]:
    """Every mask decodes whole; every row of areas.csv describes a mask on disk, exactly."""
    for png in (out / "masks").glob("*.png"):
        with Image.open(png) as im:
            im.load()  # a truncated PNG raises here
    rows = _rows(out)
    for r in rows:
        mask = read_mask(r["mask"])
        assert int(r["lesion_area_px"]) == int(mask.sum()), r
        assert (int(r["height"]), int(r["width"])) == mask.shape
    assert len({r["mask"] for r in rows}) == len(rows)  # no row twice
    return rows


def test_a_second_prediction_into_one_folder_is_refused_or_added(tiny_checkpoint, tmp_path, capsys):
    first, second = _images(tmp_path / "a", 2), _images(tmp_path / "b", 3)
    for i, p in enumerate(sorted(second.iterdir())):  # other names than the first run's
        p.rename(second / f"other{i}.png")
    out = tmp_path / "out"
    args = [str(tiny_checkpoint), "--backend", "torch", "--out", str(out), "--quiet"]
    assert main(["predict", args[0], str(first), *args[1:]]) == 0
    before = (out / "areas.csv").read_bytes()
    assert main(["predict", args[0], str(second), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "earlier prediction" in err
    assert (out / "areas.csv").read_bytes() == before  # a refused command changes nothing
    assert main(["predict", args[0], str(second), *args[1:], "--overwrite"]) == 0
    rows = _check_consistent(out)
    assert sorted(Path(r["mask"]).name for r in rows) == sorted(
        p.name for p in (out / "masks").iterdir()) and len(rows) == 5
    assert main(["predict", args[0], str(first), *args[1:], "--overwrite"]) == 0  # same names
    assert len(_check_consistent(out)) == 5


def test_kill_9_mid_prediction_leaves_no_truncated_png(tiny_checkpoint, tmp_path):
    n = 24
    src = _images(tmp_path / "in", n, size=(600, 700))  # large enough that writing takes time
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmnet", "predict", str(tiny_checkpoint), str(src), "--out",
           str(out), "--backend", "torch", "--quiet", "--threads", "1"]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0  # an earlier run
    before = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    proc = subprocess.Popen([*cmd, "--overwrite", "--threshold", "0.45"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, restarted = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        done = len(_rows(out))
        restarted = restarted or done < n  # the new run has set aside the rows it will replace
        if restarted and done >= 5:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = _check_consistent(out)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(rows) < n, len(rows)  # killed part-way, and the rows say so
    assert set(before) <= {p.name for p in (out / "masks").glob("*.png")}  # nothing lost
    # what a killed write leaves is a hidden .part file, never a PNG name; the next run removes it
    assert all(p.name.startswith(".") and p.suffix == ".part"
               for p in (out / "masks").iterdir() if p.suffix != ".png")
    assert subprocess.run([*cmd, "--overwrite"], capture_output=True, timeout=300).returncode == 0
    assert not [p for p in (out / "masks").iterdir() if p.suffix != ".png"]
    assert len(_check_consistent(out)) == n


@pytest.mark.parametrize("value", ["nan", "2", "-1", "inf"])
def test_threshold_outside_0_1_is_refused(tiny_checkpoint, tmp_path, value, capsys):
    src = _images(tmp_path / "in", 1)
    assert main(["predict", str(tiny_checkpoint), str(src), "--out", str(tmp_path / "o"),
                 "--threshold", value]) == 2
    assert "in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_output_folders_are_one_line(tiny_checkpoint, tmp_path, capsys):
    src = _images(tmp_path / "in", 1)
    (tmp_path / "file").write_text("x")
    ro = Path("/sys/lmnet_test_out")  # not writable, even for root (CI runs as root)
    for out, match in ((tmp_path / "file", "is a file"), (ro, "cannot write")):
        assert main(["predict", str(tiny_checkpoint), str(src), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err


def test_out_dot_still_reads_the_inputs_beside_it(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    _images(tmp_path / "cases", 2)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(tiny_checkpoint), "cases", "--out", ".", "--backend", "torch",
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["im000.png", "im001.png"]
    assert main(["predict", str(tiny_checkpoint), ".", "--out", ".", "--backend", "torch",
                 "--quiet", "--overwrite"]) == 0  # its own masks/ and overlays/ are left out
    assert "skipped 4 file(s) in the output folder" in capsys.readouterr().err
    assert len(_check_consistent(tmp_path)) == 2


def test_threads_above_the_cpus_are_capped_with_a_note(capsys):
    assert main(["list-models", "--threads", str((os.cpu_count() or 1) + 997)]) == 0
    assert "is more than the" in capsys.readouterr().err
