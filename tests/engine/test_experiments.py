"""``lmnet experiment``: a tiny matrix on a BUSI miniature: skip, resume, budget, partial tables."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml

from lmnet.cli.main import main
from lmnet.engine.experiments import load_experiment, plan_runs, run_experiment, run_status
from lmnet.engine.train import train


@pytest.fixture()
def experiment(busi_mini, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "data": str(busi_mini), "out": str(tmp_path / "results"),
        "models": ["lmnet", {"label": "basic", "model": "basic_unet"}], "seeds": [0, 1],
        "recipe": {"image_size": 32, "epochs": 2, "batch_size": 4, "split_ratios": [0.6, 0.2, 0.2],
                   "split_seed": 0},
        "caption": "Tiny test matrix.",
        "settings": {"longer": {"epochs": 3, "budget_minutes": 1e-4}},
    }))
    return path


def _rows(path):
    return list(csv.DictReader(path.open()))


@pytest.mark.slow  # trains a matrix of tiny runs
def test_matrix_skip_resume_and_tables(experiment, capsys, monkeypatch, ctrl_c_at_step):
    cfg = load_experiment(experiment)
    runs = plan_runs(cfg)
    assert [(r.label, r.seed) for r in runs] == [("lmnet", 0), ("lmnet", 1), ("basic", 0), ("basic", 1)]
    # one run cut short (Ctrl-C in its third step) before the matrix starts: the matrix resumes it
    cut = runs[2]
    ctrl_c_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        train(cut.config, progress=False)
    monkeypatch.undo()  # the loss computes normally again
    assert run_status(cut, cfg) == "partial"
    assert main(["experiment", str(experiment), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs (0 done, 1 cut short, 3 new)" in out and "estimated" in out
    assert not (runs[0].run_dir / "log.csv").exists()  # a dry run trains nothing
    from lmnet.engine import train as train_module

    monkeypatch.setattr(train_module, "step_seconds", lambda *a: pytest.fail("timed again"))
    assert main(["experiment", str(experiment), "--dry-run"]) == 0  # step times kept per machine
    assert out == capsys.readouterr().out
    monkeypatch.undo()
    # the matrix stops (as if the session ended) after two runs: tables from what finished
    calls = []

    def stop_after_two(entry):
        calls.append(entry["status"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False, echo=lambda *_: None, after_run=stop_after_two)
    assert calls == ["done", "done"]
    table = (cfg_dir := runs[0].run_dir.parents[1]) / "table_paper.csv"
    rows = {r["Model"]: r for r in _rows(table)}
    assert rows["lmnet"]["Runs"] == "2" and rows["basic"]["Runs"] == "0"
    assert rows["basic"]["mDice"] == "n/a" and "±" in rows["lmnet"]["mDice"]
    # run again: finished runs are skipped, the cut one resumed, the rest trained
    assert [run_status(r, cfg) for r in runs] == ["done", "done", "partial", "new"]
    plan = run_experiment(cfg, progress=False, echo=lambda *_: None)
    assert [p["status"] for p in plan] == ["done"] * 4
    assert all(len(_rows(r.run_dir / "log.csv")) == 2 for r in runs)
    rows = {r["Model"]: r for r in _rows(cfg_dir / "table_foreground.csv")}
    assert rows["basic"]["Runs"] == "2"
    header = list(_rows(cfg_dir / "table_paper.csv")[0])
    assert header == ["Model", "Runs", "Epochs", "Min/run", "Accuracy", "Precision", "Recall",
                      "mDice", "mIoU", "Hd", "RAD", "MACs (G)", "Params (M)"]  # the paper's order
    assert rows["basic"]["Epochs"] == "2 of 2"
    ledger = _rows(cfg_dir / "runs.csv")
    assert [(r["Model"], r["Seed"], r["Status"], r["Epochs"], r["Cut by budget"]) for r in ledger] == [
        (label, seed, "done", "2/2", "") for label in ("lmnet", "basic") for seed in ("0", "1")]
    assert all(r["Commits"] for r in ledger)  # the commit(s) each run was trained at
    # split_seed fixed: both seeds are scored on the same test images
    assert (runs[0].run_dir / "split.json").read_text() == (runs[1].run_dir / "split.json").read_text()
    groups = _rows(cfg_dir / "table_paper_subgroups.csv")
    assert {g["Subgroup"] for g in groups} == {"benign", "malignant", "normal"}
    assert "Tiny test matrix." in (cfg_dir / "table_paper.md").read_text()
    verdict = _rows(cfg_dir / "verdict.csv")  # LM-Net (the plain lmnet row) against the others
    assert [v["Against"] for v in verdict] == ["basic"] and verdict[0]["Runs"] == "2 / 2"
    assert all(verdict[0][h].split(" ")[0] in ("wins", "ties", "loses")
               for h in ("mDice", "mIoU", "Dice (fg)", "IoU (fg)", "HD95"))
    assert "wins against" in (cfg_dir / "verdict.md").read_text()
    per_class = _rows(cfg_dir / "verdict_subgroups.csv")
    assert [(v["Subgroup"], v["Against"], v["Runs"]) for v in per_class] == [
        (g, "basic", "2 / 2") for g in ("benign", "malignant", "normal")]
    assert "judgements" in (cfg_dir / "verdict_subgroups.md").read_text()
    from PIL import Image

    for fig in ("curves.png", "qualitative.png"):  # written at the end of the matrix
        with Image.open(cfg_dir / fig) as im:
            assert im.format == "PNG" and im.width > 400
    with Image.open(cfg_dir / "qualitative.png") as im:  # 4 test images x (image, truth, 2 models)
        assert im.height > im.width * 0.8
    before = (runs[0].run_dir / "log.csv").read_text()
    run_experiment(cfg, progress=False, echo=lambda *_: None)  # nothing left to do
    assert (runs[0].run_dir / "log.csv").read_text() == before


@pytest.mark.slow  # trains a matrix of tiny runs
def test_setting_and_wall_clock_budget(experiment):
    cfg = load_experiment(experiment, "longer")
    assert cfg.name == "tiny_longer" and cfg.recipe["epochs"] == 3 and cfg.budget_minutes == 1e-4
    cfg.models, cfg.seeds = ["lmnet"], [0]
    plan = run_experiment(cfg, progress=False, echo=lambda *_: None)
    run = plan_runs(cfg)[0]
    assert plan[0]["status"] == "done"  # its budget is spent: evaluated as it stands
    assert len(_rows(run.run_dir / "log.csv")) < 3
    assert (run.run_dir / "eval_test_resized" / "metrics.json").is_file()
    ledger = _rows(run.run_dir.parents[1] / "runs.csv")
    assert ledger[0]["Cut by budget"] == "yes" and ledger[0]["Epochs"].endswith("/3")
    with pytest.raises(ValueError, match="no setting 'gpu'"):
        load_experiment(experiment, "gpu")


@pytest.mark.slow  # trains a matrix of tiny runs
def test_call_time_budget_stops_the_matrix_cleanly_and_the_same_command_resumes(experiment, capsys):
    """``--time-budget``: a session's share of a long matrix. The run in progress is saved where it
    stands (not evaluated: its own budget is not spent) and the rest wait for the next call."""
    cfg = load_experiment(experiment)
    cfg.models = ["lmnet"]
    path = experiment.with_name("one.yaml")
    path.write_text(yaml.safe_dump({**yaml.safe_load(experiment.read_text()), "models": ["lmnet"]}))
    assert main(["experiment", str(path), "--time-budget", "0.0001", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "time budget of 0.0001 min is spent; 2 run(s) left" in out
    runs = plan_runs(cfg)
    assert [run_status(r, cfg) for r in runs] == ["partial", "new"]
    assert not (runs[0].run_dir / "eval_test_resized").exists()
    plan = run_experiment(cfg, progress=False, echo=lambda *_: None)  # no call budget: all of it
    assert [p["status"] for p in plan] == ["done", "done"]
    assert all(len(_rows(r.run_dir / "log.csv")) == 2 for r in runs)
    with pytest.raises(ValueError, match="time_budget must be > 0"):
        run_experiment(cfg, time_budget=0)


def test_dry_run_beside_a_training_process_does_not_keep_its_step_times(experiment, capsys,
                                                                         monkeypatch):
    """A step timed while another process trains in the runs folder is inflated: the plan uses it
    but ``step_seconds.json`` does not keep it, so a later plan times the model again."""
    import subprocess
    import sys

    from lmnet.engine import train as train_module

    cfg = load_experiment(experiment)
    runs = plan_runs(cfg)
    timed = []
    monkeypatch.setattr(train_module, "step_seconds", lambda *a, **k: timed.append(1) or 0.5)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs[0].run_dir.mkdir(parents=True)
        (runs[0].run_dir / ".lock").write_text(str(other.pid))
        assert main(["experiment", str(experiment), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"process {other.pid} is training {runs[0].run_dir}" in out
        assert len(timed) == 2 and not (runs[0].run_dir.parent / "step_seconds.json").exists()
    finally:
        other.kill()
        other.wait()
    assert main(["experiment", str(experiment), "--dry-run"]) == 0  # the lock's process is gone
    assert "is training" not in capsys.readouterr().out
    assert len(timed) == 4 and (runs[0].run_dir.parent / "step_seconds.json").is_file()


@pytest.mark.parametrize("change,message", [
    ({"recipe": {"epochz": 1}}, "unknown TrainConfig key"),
    ({"models": []}, "at least one model"),
    ({"seeds": "0"}, "seeds must be a list"),
    ({"models": [{"label": "x"}]}, "a model is a registered name"),
    ({"reference": "nope"}, "reference 'nope' is not a model label"),
    ({"models": [{"model": "lmnet", "recipe": {"seed": 3}}]}, "recipe key(s) ['seed'] are not"),
    ({"models": [{"model": "lmnet", "recipe": {"epochz": 3}}]}, "recipe key(s) ['epochz'] are not"),
    ({"models": [{"model": "lmnet", "recipe": [3]}]}, "a model's recipe is a mapping"),
])
def test_bad_experiment_configs(experiment, tmp_path, capsys, change, message):
    values = {**yaml.safe_load(experiment.read_text()), **change}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    assert main(["experiment", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_shipped_experiment_configs_plan_their_matrices():
    from tests.conftest import ROOT

    configs = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"table1_kvasir", "table6_kvasir", "table8_kvasir",
                                        "table9_kvasir", "table10_kvasir", "table3_busi"}
    for path in configs:
        cfg = load_experiment(path)
        runs = plan_runs(cfg)
        assert len(runs) == len(cfg.models) * len(cfg.seeds) >= 4
        assert len({r.run_dir for r in runs}) == len(runs)
        own = {m["label"] for m in cfg.models if isinstance(m, dict) and m.get("recipe")}
        shared = [r for r in runs if r.label not in own]
        assert all(r.config.epochs == shared[0].config.epochs for r in shared)  # one recipe
        assert all(r.config.epochs != shared[0].config.epochs for r in runs if r.label in own)
        if "gpu" not in cfg.settings:  # only a CPU-budget companion of a paper's table
            assert path.stem.endswith("_equal_time")
            continue
        gpu = load_experiment(path, "gpu")
        assert gpu.recipe["epochs"] == 200 and gpu.recipe["image_size"] == 256
        assert gpu.budget_minutes is None and gpu.name == f"{cfg.name}_gpu"


def test_verdict_wins_ties_and_loses_by_the_seed_spread():
    from lmnet.engine.experiments import verdict

    assert verdict([80.0, 82.0], [70.0, 71.0]) == "wins +10.50"
    assert verdict([80.0, 82.0], [79.0, 81.0]) == "ties +1.00"  # within std 1.41 + 1.41
    assert verdict([70.0, 71.0], [80.0, 82.0]) == "loses -10.50"
    assert verdict([10.0, 11.0], [20.0, 21.0], higher_is_better=False) == "wins -10.00"  # HD95
    assert verdict([80.0], [70.0, 71.0]) == "ahead (1 run) +9.50"  # no spread to judge by
    assert verdict([60.0], [70.0]) == "behind (1 run) -10.00"
    assert verdict([], [70.0]) == "n/a"


def test_subgroup_verdict_shows_a_class_where_lmnet_loses(tmp_path):
    """Ahead overall, behind on one class: the per-subgroup verdict says so."""
    from lmnet.engine.experiment_tables import ExperimentConfig, _write_verdict

    def summary(dice):
        return {"paper_mdice": dice, "paper_miou": dice, "fg_dice_mean": dice,
                "fg_iou_mean": dice, "hd95_mean": 10.0}

    def result(overall, benign, malignant):
        return {"all": summary(overall), "groups": {"benign": summary(benign),
                                                    "malignant": summary(malignant)}}

    results = {"lmnet": [result(0.80, 0.90, 0.40), result(0.81, 0.91, 0.41)],
               "basic": [result(0.70, 0.60, 0.60), result(0.71, 0.61, 0.61)]}
    cfg = ExperimentConfig(name="v", models=["lmnet", "basic"])
    written = _write_verdict(cfg, tmp_path, results, {"lmnet": (2.0, 1.0), "basic": (1.0, 1.0)}, "")
    assert _rows(written["verdict_csv"])[0]["Dice (fg)"] == "wins +10.00"
    rows = {r["Subgroup"]: r for r in _rows(written["verdict_subgroups_csv"])}
    assert rows["benign"]["Dice (fg)"] == "wins +30.00"
    assert rows["malignant"]["Dice (fg)"] == "loses -20.00"
    assert rows["malignant"]["HD95"].startswith("ties")
    text = written["verdict_subgroups_md"].read_text()
    assert "- malignant: of 5 judgements (other rows x metrics) lmnet wins 0, ties 1, loses 4" in text


def test_figure_shows_every_subgroup_in_turn():
    from types import SimpleNamespace

    from lmnet.engine.figures import figure_samples

    def samples(groups):
        return [SimpleNamespace(name=f"{g}/{i}", group=g) for i, g in enumerate(groups)]

    busi = samples(["benign"] * 5 + ["malignant"] * 3 + ["normal"])
    assert [s.name for s in figure_samples(busi, 4)] == ["benign/0", "malignant/5", "normal/8",
                                                        "benign/1"]
    kvasir = samples([None] * 6)
    assert figure_samples(kvasir, 4) == kvasir[:4]


def test_epochs_cell_reads_trained_of_planned():
    from lmnet.engine.experiment_tables import _epochs_cell

    assert _epochs_cell([4, 4], 8) == "4 of 8"
    assert _epochs_cell([4, 5], 8) == "4, 5 of 8"
    assert _epochs_cell([], 8) == "n/a"


def test_seed_band_keeps_every_epoch_of_the_longer_run():
    from lmnet.engine.figures import seed_band

    mean, low, high = seed_band([[0.5, 0.6, 0.7], [0.3, 0.4, 0.5, 0.6, 0.8]])
    assert len(mean) == 5
    np.testing.assert_allclose(mean, [0.4, 0.5, 0.6, 0.6, 0.8])
    np.testing.assert_allclose(low, [0.3, 0.4, 0.5, 0.6, 0.8])
    np.testing.assert_allclose(high, [0.5, 0.6, 0.7, 0.6, 0.8])


def test_no_curves_before_any_epoch(tmp_path):
    from lmnet.engine.figures import plot_curves

    assert plot_curves({"lmnet": [tmp_path / "nothing"]}, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


@pytest.mark.slow  # trains a matrix of tiny runs
def test_experiments_sharing_a_runs_folder_train_a_model_once(busi_mini, tmp_path, capsys):
    def write(name, models, epochs=1):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "data": str(busi_mini), "out": str(tmp_path / "results"),
            "runs": str(tmp_path / "shared"), "models": models, "seeds": [0],
            "recipe": {"image_size": 32, "epochs": epochs, "batch_size": 4,
                       "split_ratios": [0.6, 0.2, 0.2]}}))
        return path

    first = write("a", ["lmnet"])
    assert main(["experiment", str(first), "--quiet"]) == 0
    second = write("b", [{"label": "LM-Net", "model": "lmnet"}, {"label": "basic", "model": "basic_unet"}])
    cfg = load_experiment(second)
    runs = plan_runs(cfg)
    assert runs[0].run_dir == tmp_path / "shared" / "lmnet_s0"
    assert [run_status(r, cfg) for r in runs] == ["done", "new"]  # LM-Net is a's run
    log_before = (runs[0].run_dir / "log.csv").read_text()
    assert main(["experiment", str(second), "--quiet"]) == 0
    assert (runs[0].run_dir / "log.csv").read_text() == log_before  # not trained again
    rows = {r["Model"]: r for r in _rows(tmp_path / "results" / "b" / "table_paper.csv")}
    assert rows["LM-Net"]["Runs"] == "1" and rows["basic"]["Runs"] == "1"
    capsys.readouterr()
    other = write("c", ["lmnet"], epochs=2)  # another recipe cannot reuse those runs
    assert main(["experiment", str(other), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another recipe (epochs 1 there, 2 here)" in err
    capped = write("d", ["lmnet"])  # nor another wall-clock budget
    values = yaml.safe_load(capped.read_text())
    capped.write_text(yaml.safe_dump({**values, "budget_minutes": 30}))
    assert main(["experiment", str(capped), "--dry-run"]) == 2
    assert "budget_minutes None there, 30 here" in capsys.readouterr().err


@pytest.mark.slow  # trains a matrix of tiny runs
def test_a_row_with_its_own_recipe_trains_apart_and_says_so(busi_mini, tmp_path):
    """An equal wall-clock row (a faster baseline trained for more epochs): its own run folder
    beside the shared ones, its epochs in the table and its keys in the caption."""
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own", "data": str(busi_mini), "out": str(tmp_path / "results"),
        "runs": str(tmp_path / "shared"), "seeds": [0],
        "models": ["lmnet", "basic_unet",
                   {"label": "basic, LM-Net's time", "model": "basic_unet", "recipe": {"epochs": 2}}],
        "recipe": {"image_size": 32, "epochs": 1, "batch_size": 4, "split_ratios": [0.6, 0.2, 0.2]}}))
    cfg = load_experiment(path)
    runs = plan_runs(cfg)
    assert [r.config.epochs for r in runs] == [1, 1, 2]
    assert runs[1].run_dir.name == "basic_unet_s0"
    assert runs[2].run_dir.name.startswith("basic_unet_") and runs[2].run_dir != runs[1].run_dir
    assert main(["experiment", str(path), "--quiet"]) == 0
    rows = {r["Model"]: r for r in _rows(tmp_path / "results" / "own" / "table_paper.csv")}
    assert rows["basic_unet"]["Epochs"] == "1 of 1"
    assert rows["basic, LM-Net's time"]["Epochs"] == "2 of 2"
    md = (tmp_path / "results" / "own" / "table_paper.md").read_text()
    assert "32 x 32, 1 epochs" in md and "own recipe keys: basic, LM-Net's time: epochs 2." in md
    verdict_rows = {r["Against"] for r in _rows(tmp_path / "results" / "own" / "verdict.csv")}
    assert verdict_rows == {"basic_unet", "basic, LM-Net's time"}


@pytest.mark.slow  # trains a matrix of tiny runs
def test_budget_counts_validation_and_a_run_is_left_to_the_process_training_it(experiment, tmp_path):
    """The budget is the wall-clock of the runner's training calls (validation included, as the
    trainer's own clock counts it): a run whose record reaches it is trained, to be evaluated.
    A run another live process holds (its ``.lock``) is skipped; a lock left by a dead one is not."""
    import json
    import os
    import subprocess
    import sys

    from lmnet.engine.experiments import used_seconds

    cfg = load_experiment(experiment)
    cfg.models, cfg.seeds, cfg.budget_minutes = ["lmnet"], [0], 5.0
    run = plan_runs(cfg)[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "budget.json").write_text(json.dumps({"budget_minutes": 5.0, "seconds": 299.0}))
    assert used_seconds(run) == 299.0 and run_status(run, cfg) == "new"
    (run.run_dir / "budget.json").write_text(json.dumps({"budget_minutes": 5.0, "seconds": 300.5}))
    assert run_status(run, cfg) == "trained"
    (run.run_dir / "budget.json").unlink()

    (run.run_dir / ".lock").write_text(str(os.getppid()))  # a live process
    lines = []
    plan = run_experiment(cfg, progress=False, echo=lines.append)
    assert plan[0]["status"] == "new" and any("running in another process" in x for x in lines)
    assert not (run.run_dir / "log.csv").exists() and (run.run_dir / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run.run_dir / ".lock").write_text(dead)  # its process has ended: taken over
    plan = run_experiment(cfg, progress=False, echo=lambda *_: None)
    assert plan[0]["status"] == "done" and not (run.run_dir / ".lock").exists()
    record = json.loads((run.run_dir / "budget.json").read_text())
    assert record["budget_minutes"] == 5.0 and record["seconds"] > 0


@pytest.mark.slow  # trains a matrix of tiny runs
def test_finished_runs_rebuild_tables_and_figures_from_their_small_files(experiment):
    """A matrix's run folders without their checkpoints (the files a session commits as results)
    still give the same tables and figures, and the runs stay done."""
    import shutil

    from PIL import Image

    from lmnet.engine.experiments import write_figures, write_tables

    cfg = load_experiment(experiment)
    cfg.seeds = [0]
    run_experiment(cfg, progress=False, echo=lambda *_: None)
    runs = plan_runs(cfg)
    out = runs[0].run_dir.parents[1]
    before = {f: (out / f).read_bytes() for f in ("table_paper.csv", "table_foreground.md")}
    with Image.open(out / "qualitative.png") as im:
        figure = np.asarray(im).copy()
    for run in runs:
        assert (run.run_dir / "figure_masks_test.npz").is_file()
        for p in run.run_dir.glob("checkpoint_*.pt"):
            p.unlink()
        shutil.rmtree(run.run_dir / "tb", ignore_errors=True)
    (out / "qualitative.png").unlink()
    write_tables(cfg)
    write_figures(cfg)
    assert [run_status(r, cfg) for r in runs] == ["done", "done"]
    assert {f: (out / f).read_bytes() for f in before} == before
    with Image.open(out / "qualitative.png") as im:
        assert np.array_equal(np.asarray(im), figure)


def test_a_network_s_size_is_counted_once_a_process(monkeypatch):
    """The tables are written again after every run of a matrix: each network's parameters and
    MACs are counted once (counting LM-Net at 256 x 256 takes seconds), per size."""
    from types import SimpleNamespace

    from lmnet.config import TrainConfig
    from lmnet.engine import experiment_tables
    from lmnet.models import _size

    counted, real = [], _size.size_report
    monkeypatch.setattr(_size, "size_report",
                        lambda model, name, *a: counted.append(name) or real(model, name, *a))
    experiment_tables._counted_size.cache_clear()
    run = SimpleNamespace(config=TrainConfig(model="basic_unet", image_size=32))
    first = experiment_tables._model_size(run)
    assert experiment_tables._model_size(run) == first and counted == ["basic_unet"]
    larger = experiment_tables._model_size(
        SimpleNamespace(config=TrainConfig(model="basic_unet", image_size=64)))
    assert counted == ["basic_unet"] * 2
    assert larger[0] == first[0] and abs(larger[1] / first[1] - 4) < 0.01  # MACs grow with area
