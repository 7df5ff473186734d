"""The ``lmnet`` command: info and list-models, including bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmnet.cli.main import main


def test_info_prints_both_forms_and_the_paper_figures(capsys):
    assert main(["info", "lmnet", "--size", "256"]) == 0
    out = capsys.readouterr().out
    assert "3,966,566" in out and "deployed" in out
    assert "5.4 M" in out and "4.66 G" in out and "MACs" in out


def test_info_json(capsys):
    assert main(["info", "lmnet", "--size", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params_train"] == 3_966_566
    assert d["params_deployed"] < d["params_train"]
    assert d["macs_deployed"] < d["macs_train"]
    assert d["input_size"] == [3, 64, 64]
    assert d["config"]["bridge"] == "multi"


def test_info_with_overrides(capsys):
    assert main(["info", "lmnet", "--size", "64", "--json", "--model-option", "branches=3x3,5x5",
                 "--model-option", "bridge=none", "--n-classes", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["branches"] == ["3x3", "5x5"] and d["config"]["n_classes"] == 1


@pytest.mark.parametrize("argv,match", [
    (["info", "nope"], "unknown model 'nope'.*Known models"),
    (["info", "lmnet", "--size", "100"], "multiple of 16"),
    (["info", "lmnet", "--model-option", "bridge=gft"], "bridge must be one of"),
    (["info", "lmnet", "--set", "width"], "KEY=VALUE"),
    (["list-models", "--filter", "zzz*"], "no model matches"),
])
def test_bad_input_is_an_error_message_not_a_traceback(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(match, err), err


def test_list_models_json(capsys):
    assert main(["list-models", "--filter", "lmnet_skip*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["lmnet_skip_single", "lmnet_skip_single_lft",
                                        "lmnet_skip_multi"]
    assert all(r["params"] > 0 for r in rows)


@pytest.mark.slow
def test_console_entry_point_runs():
    # The installed script and ``python -m lmnet`` are the same program.
    proc = subprocess.run([sys.executable, "-m", "lmnet", "list-models", "--filter", "unet"],
                          capture_output=True, text=True, check=True)
    assert "31,113,282" in proc.stdout


def test_renamed_flags_keep_their_old_spelling_for_a_release(tiny_checkpoint, kvasir_mini,
                                                             tmp_path, capsys):
    """--engine is --backend, info's --set is --model-option, train's --split is --split-file:
    the old spellings still work, with a note, and are not in --help."""
    images = tmp_path / "in"
    images.mkdir()
    for p in sorted((kvasir_mini / "images").glob("*.jpg"))[:1]:
        (images / p.name).write_bytes(p.read_bytes())
    assert main(["predict", str(tiny_checkpoint), str(images), "--out", str(tmp_path / "o"),
                 "--engine", "torch", "--tta", "none", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "--engine is now --backend" in err
    assert main(["info", "lmnet", "--size", "64", "--json", "--set", "width=24"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["config"]["width"] == 24
    assert "--set is now --model-option" in captured.err
    # train's old --split (a split file) reaches the same config key as --split-file
    from lmnet.cli.main import build_parser

    parser = build_parser()
    old = parser.parse_args(["train", "--split", "s.json"])
    new = parser.parse_args(["train", "--split-file", "s.json"])
    assert old.split_file == new.split_file == "s.json"
    for command in ("predict", "evaluate"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        shown = capsys.readouterr().out
        assert "--backend" in shown and "--engine" not in shown
