"""The flags of ``evaluate``, ``predict`` and ``export`` are built from their config dataclasses:
one flag per field, the field's default, its comment as help; old spellings still parse."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from lmnet.cli._flags import config_flags, config_from_args
from lmnet.cli.main import build_parser
from lmnet.engine.evaluate import EvaluateConfig
from lmnet.engine.export import ExportConfig
from lmnet.engine.predict import PredictConfig


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("command,cls,required", [
    ("evaluate", EvaluateConfig, []),
    ("predict", PredictConfig, ["some/image.png", "--weights", "kvasir", "--out", "o"]),
    ("export", ExportConfig, ["--out", "m.onnx"]),
])
def test_every_field_is_a_flag_with_its_default(command, cls, required):
    args = _sub(command).parse_args(required)
    cfg = config_from_args(cls, args, args.config_keys)
    skipped = {"checkpoint", "inputs"} if cls is PredictConfig else set()
    assert set(args.config_keys) == {f.name for f in dataclasses.fields(cls)} - skipped
    given = {"out", "weights"} if required else set()
    for f in dataclasses.fields(cls):
        if f.name not in given | skipped:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(cfg, f.name) == default, f.name


def test_flags_follow_the_fields(capsys):
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    @dataclasses.dataclass
    class Demo:
        path: str | None = dataclasses.field(default=None, metadata={"positional": "?"})  # a path
        size: int = 3                   # how big
        ratio: list[float] | None = dataclasses.field(default=None, metadata={"nargs": 2})  # two numbers
        mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})  # which
        strict: bool = True             # check it

    keys = config_flags(p, Demo)
    cfg = config_from_args(Demo, p.parse_args(["x", "--size", "5", "--ratio", "1", "2.5",
                                               "--mode", "b", "--no-strict"]), keys)
    assert cfg == Demo("x", 5, [1.0, 2.5], "b", False)
    assert config_from_args(Demo, p.parse_args([]), keys) == Demo()
    text = p.format_help()
    assert "how big" in text and "two numbers" in text and "--no-strict" in text
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_old_backend_spelling_parses_into_the_new_field():
    args = _sub("evaluate").parse_args(["run", "--engine", "onnx"])
    assert config_from_args(EvaluateConfig, args, args.config_keys).backend == "onnx"
    assert "--engine is now --backend" in args._old_spellings[0]
