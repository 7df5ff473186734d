"""The run folder: its file names in one place, its small files read and written."""
from __future__ import annotations

import csv

from lmnet.run_folder import RunFolder


def test_names_reads_and_writes(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not RunFolder.holds_run(run.path) and run.read_log() == [] and run.read_sessions() == []
    run.path.mkdir()
    run.write_config({"model": "lmnet", "epochs": 2})
    assert not RunFolder.holds_run(run.path)  # a config alone: not yet a run
    assert run.read_config() == {"model": "lmnet", "epochs": 2}
    with run.log.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["epoch", "val_fg_dice"], ["1", "0.5"], ["2", "0.625"]])
    assert [r["val_fg_dice"] for r in run.read_log()] == ["0.5", "0.625"]
    assert RunFolder.holds_run(run.path)  # a config beside a log
    run.add_session({"git_commit": "abc"})
    run.add_session({"git_commit": "def"})
    assert [s["git_commit"] for s in run.read_sessions()] == ["abc", "def"]
    assert run.checkpoint() is None
    run.last.write_bytes(b"x")
    assert run.checkpoint() == run.last
    run.best.write_bytes(b"x")
    assert run.checkpoint() == run.best
    assert run.read_init() is None
    run.write_init({"source": "kvasir", "form": "deployed"})
    run.write_ddp({"world_size": 2})
    assert run.read_init()["form"] == "deployed" and (run / RunFolder.DDP).is_file()
    assert run.eval_dir("test", "original").name == "eval_test_original"
    assert {run.budget.name, run.lock.name, run.figure_masks("test").name} == {
        "budget.json", ".lock", "figure_masks_test.npz"}
