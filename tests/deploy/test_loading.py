"""``--engine auto`` measures, picks the fastest, caches per machine; batched prediction."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmnet.cli.main import main
from lmnet.deploy import loading
from lmnet.deploy.backends import ENGINES, engine_available
from lmnet.deploy.loading import choose_engine, load_model, load_predictor, probe_cache_path
from lmnet.engine.predict import predict_files
from tests.conftest import ROOT

SAMPLE_IMAGES = sorted((ROOT / "src" / "lmnet" / "sample_data" / "kvasir_sample" / "images").glob("*.jpg"))
INSTALLED = [e for e in ENGINES if engine_available(e)]
several_engines = pytest.mark.skipif(len(INSTALLED) < 2, reason="needs onnxruntime or openvino "
                                     "beside PyTorch (the 'test' extra)")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LMNET_CACHE_DIR", str(tmp_path / "cache"))
    return probe_cache_path()


@pytest.fixture()
def fake_timer(monkeypatch):
    """Engines 'take' the given milliseconds (stand-ins: every engine runs the PyTorch model, so
    that no export slows the test); returns the list of engines timed, ``timed.built`` those built."""

    class Timed(list):
        built: list[str]

    timed = Timed()
    timed.built = []

    def build(model, cfg, engine, precision="fp32", threads=None):
        timed.built.append(engine)
        return model

    def arm(ms: dict[str, float]) -> Timed:
        def fake(run, engine, x, precision, **_):
            timed.append(engine)
            return ms[engine] / 1000
        monkeypatch.setattr(loading, "time_runner", fake)
        monkeypatch.setattr(loading, "make_runner", build)
        timed.clear()
        timed.built.clear()
        return timed
    return arm


@several_engines
def test_auto_picks_the_engine_measured_fastest_and_caches_it(tiny_checkpoint, cache, fake_timer):
    model, cfg = load_model(tiny_checkpoint)
    slow_first = {e: 10.0 * (len(INSTALLED) - i) for i, e in enumerate(INSTALLED)}  # last is fastest
    timed = fake_timer(slow_first)
    chosen = choose_engine(model, cfg, batch_size=2)
    assert chosen.engine == INSTALLED[-1] and timed == INSTALLED
    assert f"engine auto: {INSTALLED[-1]}" in chosen.note and "batch 2" in chosen.note
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["engine"] == INSTALLED[-1] and set(entry["ms"]) == set(INSTALLED)
    # Cached: the next call builds the chosen engine only and measures nothing.
    timed.clear()
    timed.built.clear()
    again = choose_engine(model, cfg, batch_size=2)
    assert again.engine == INSTALLED[-1] and timed == [] and "cached in" in again.note
    assert timed.built == [INSTALLED[-1]]
    # Another batch size is another setting: measured anew.
    fastest_first = {e: 10.0 * (i + 1) for i, e in enumerate(INSTALLED)}
    timed = fake_timer(fastest_first)
    assert choose_engine(model, cfg, batch_size=8).engine == INSTALLED[0]
    assert timed == INSTALLED and len(json.loads(cache.read_text())) == 2


@several_engines
@pytest.mark.slow
def test_auto_runs_the_real_probe(tiny_checkpoint, cache):
    """Without stand-ins: every installed engine is timed, the note names the fastest."""
    model, cfg = load_model(tiny_checkpoint)
    chosen = choose_engine(model, cfg)
    ms = next(iter(json.loads(cache.read_text()).values()))["ms"]
    assert set(ms) == set(INSTALLED) and all(v > 0 for v in ms.values())
    # the cache rounds to 0.01 ms: two engines of a tiny model can round to one value, and the
    # choice (made on the unrounded times) is either of them
    assert ms[chosen.engine] == min(ms.values())
    x = np.zeros((1, 3, cfg.image_size, cfg.image_size), np.float32)
    if chosen.engine != "torch":
        assert chosen.model(x).shape == (1, 2, cfg.image_size, cfg.image_size)


@several_engines
def test_a_corrupt_or_unwritable_cache_is_measured_again(tiny_checkpoint, cache, fake_timer,
                                                         tmp_path, monkeypatch):
    model, cfg = load_model(tiny_checkpoint)
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    timed = fake_timer({e: 5.0 for e in INSTALLED})
    assert choose_engine(model, cfg).engine in INSTALLED and timed == INSTALLED
    assert json.loads(cache.read_text())  # rewritten as valid JSON
    fake_timer({e: 5.0 for e in INSTALLED})
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LMNET_CACHE_DIR", str(blocker / "sub"))  # a folder that cannot exist
    chosen = choose_engine(model, cfg)
    assert "not cached" in chosen.note


@several_engines
def test_bf16_leaves_out_engines_without_it(tiny_checkpoint, cache, fake_timer):
    model, cfg = load_model(tiny_checkpoint)
    timed = fake_timer({e: 1.0 for e in INSTALLED})
    choose_engine(model, cfg, precision="bf16")
    assert "onnx" not in timed and "torch" in timed
    with pytest.raises(ValueError, match="precision 'bf16' is available with --backend torch"):
        load_predictor(tiny_checkpoint, "onnx", precision="bf16")


def _auto_timer(monkeypatch, ms: dict[str, float], agreement: float | None, bf16_cpu: bool = True):
    """Stand-ins for ``precision="auto"``: (engine, precision) pairs take ``ms["engine precision"]``,
    bf16 masks agree with fp32's at ``agreement``; returns the pairs timed and the agreement calls."""
    timed, checked = [], []

    def fake(run, engine, x, precision, **_):
        timed.append(f"{engine} {precision}")
        return ms[f"{engine} {precision}"] / 1000

    def agree(reference, run, engine, precision, cfg, count=None):
        checked.append(f"{engine} {precision}")
        return agreement

    monkeypatch.setattr(loading, "time_runner", fake)
    monkeypatch.setattr(loading, "make_runner", lambda model, cfg, engine, precision="fp32", threads=None: model)
    monkeypatch.setattr(loading, "mask_agreement", agree)
    monkeypatch.setattr(loading, "native_bf16", lambda: bf16_cpu)
    return timed, checked


def test_auto_precision_takes_bf16_only_where_it_is_faster_and_agrees(tiny_checkpoint, cache,
                                                                       monkeypatch):
    model, cfg = load_model(tiny_checkpoint)
    ms = {"torch fp32": 100.0, "torch bf16": 90.0, "onnx fp32": 80.0, "openvino fp32": 70.0,
          "openvino bf16": 40.0}
    timed, checked = _auto_timer(monkeypatch, ms, agreement=0.999)
    chosen = choose_engine(model, cfg, precision="auto", engines=("torch",))
    assert (chosen.engine, chosen.precision) == ("torch", "bf16")
    assert sorted(timed) == ["torch bf16", "torch fp32"] and checked == ["torch bf16"]
    assert "engine auto: torch bf16" in chosen.note and "Dice 0.9990" in chosen.note
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["precision"] == "bf16" and entry["bf16_agreement"] == {"torch bf16": 0.999}
    again = choose_engine(model, cfg, precision="auto", engines=("torch",))  # cached, with its reason
    assert again.precision == "bf16" and "cached in" in again.note and "Dice 0.9990" in again.note

    # Masks that disagree: the fastest bf16 candidate is dropped, every bf16 one checked, fp32 wins.
    timed, checked = _auto_timer(monkeypatch, ms, agreement=0.99)
    chosen = choose_engine(model, cfg, precision="auto", refresh=True, engines=("torch",))
    assert (chosen.engine, chosen.precision) == ("torch", "fp32") and checked == ["torch bf16"]
    assert "too low: not used" in chosen.note

    # A CPU without bf16 in hardware: bf16 is not even measured.
    timed, checked = _auto_timer(monkeypatch, ms, agreement=1.0, bf16_cpu=False)
    chosen = choose_engine(model, cfg, precision="auto", refresh=True, engines=("torch",))
    assert chosen.precision == "fp32" and checked == [] and "only candidate" in chosen.note


@several_engines
def test_auto_precision_over_every_engine(tiny_checkpoint, cache, monkeypatch):
    model, cfg = load_model(tiny_checkpoint)
    ms = {"torch fp32": 100.0, "torch bf16": 30.0, "onnx fp32": 80.0, "openvino fp32": 70.0,
          "openvino bf16": 40.0}
    timed, checked = _auto_timer(monkeypatch, ms, agreement=0.999)
    chosen = choose_engine(model, cfg, precision="auto")
    assert (chosen.engine, chosen.precision) == ("torch", "bf16") and "onnx bf16" not in timed
    assert set(timed) == {k for k in ms if k.split()[0] in INSTALLED}
    # An explicit precision is taken as it is: no agreement check.
    timed, checked = _auto_timer(monkeypatch, ms, agreement=0.5)
    assert choose_engine(model, cfg, precision="bf16", refresh=True).precision == "bf16"
    assert checked == []


def test_mask_agreement_measures_the_masks(tiny_checkpoint):
    model, cfg = load_model(tiny_checkpoint)
    model.eval()
    assert loading.mask_agreement(model, model, "torch", "fp32", cfg, count=3) == 1.0
    # Negated logits: every mask is the complement of the reference's, no pixel in common.
    inverted = lambda x: -model(torch.from_numpy(x)).detach().numpy()  # noqa: E731
    assert loading.mask_agreement(model, inverted, "onnx", "fp32", cfg, count=3) == 0.0


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for p in SAMPLE_IMAGES[:n]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "masks").iterdir())}


def test_batches_and_io_threads_give_the_same_outputs(tiny_checkpoint, tmp_path):
    src = _images(tmp_path / "in", 7)  # sizes differ: masks come back at each image's size
    (src / "broken.jpg").write_bytes(b"not a jpeg")  # fails alone, in the middle of a batch
    runs = {}
    for batch, threads in ((1, 0), (3, 2), (4, 1)):
        out = tmp_path / f"b{batch}t{threads}"
        summary = predict_files(tiny_checkpoint, [src], out, progress=False, engine="torch",
                                batch_size=batch, io_threads=threads)
        assert len(summary.written) == 7 and [p.name for p, _ in summary.failed] == ["broken.jpg"]
        rows = list(csv.DictReader((out / "areas.csv").open()))
        assert [Path(r["file"]).name for r in rows] == [p.name for p in sorted(SAMPLE_IMAGES[:7])]
        runs[(batch, threads)] = _masks(out), rows
    ref_masks, ref_rows = runs[(1, 0)]
    for masks, rows in runs.values():
        assert masks.keys() == ref_masks.keys()
        for name, m in masks.items():
            assert m.shape == ref_masks[name].shape
            assert (m != ref_masks[name]).sum() <= 5, name  # ties at the threshold only
        assert [r["height"] for r in rows] == [r["height"] for r in ref_rows]


def test_predict_cli_says_which_engine_auto_chose(tiny_checkpoint, tmp_path, capsys, cache,
                                                  fake_timer):
    fake_timer({e: 1.0 + i for i, e in enumerate(INSTALLED)})
    src = _images(tmp_path / "in", 2)
    assert main(["predict", str(tiny_checkpoint), str(src), "--out", str(tmp_path / "o"),
                 "--batch-size", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"engine auto: {INSTALLED[0]}" in err and "batch 2" in err, err
    assert main(["predict", str(tiny_checkpoint), str(src), "--out", str(tmp_path / "o"),
                 "--batch-size", "0"]) == 2
    assert "batch size must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(not engine_available("openvino"), reason="needs openvino (the 'test' extra)")
def test_openvino_conversion_is_cached_per_model(cache, monkeypatch):
    """Converting to OpenVINO takes seconds for LM-Net: done once per model, read back after.
    (A small convolutional model: the cache does not depend on the architecture.)"""
    import torch

    from lmnet.deploy import backends as engines
    from lmnet.deploy import convert as conversion

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1)).eval()
    calls = []
    convert = conversion.convert_to_openvino
    monkeypatch.setattr(conversion, "convert_to_openvino", lambda *a: calls.append(1) or convert(*a))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    first = engines.openvino_runner(model, 3, 32)(x)
    second = engines.openvino_runner(model, 3, 32)(x)
    assert len(calls) == 1 and np.array_equal(first, second)
    assert len(list((cache.parent / "openvino").glob("*.xml"))) == 1
    with torch.no_grad():
        model[0].bias.add_(1.0)  # other weights: another entry, not the stale one
    third = engines.openvino_runner(model, 3, 32)(x)
    assert len(calls) == 2 and not np.allclose(first, third)
    assert len(list((cache.parent / "openvino").glob("*.xml"))) == 2


@pytest.mark.skipif(not engine_available("openvino"), reason="needs openvino (the 'test' extra)")
def test_openvino_runs_any_size_though_compiled_for_one(cache):
    """Compiled for the model's input size (the size preprocessing feeds); any other size still
    runs (the dynamic model, compiled on first use), every output equal to PyTorch's."""
    import torch

    from lmnet.deploy import backends as engines

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1)).eval()
    run = engines.openvino_runner(model, 3, 32)
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 32, 32), (3, 3, 32, 32), (2, 3, 24, 40), (1, 3, 32, 32)]:
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(run(x), model(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_onnx_export_is_cached_per_model(tiny_checkpoint, cache, monkeypatch):
    from lmnet.deploy import backends as engines
    from lmnet.deploy import convert

    model, cfg = load_model(tiny_checkpoint)
    calls = []
    real = convert.export_onnx
    monkeypatch.setattr(convert, "export_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    first = engines.make_runner(model, cfg, "onnx")(x)
    second = engines.make_runner(model, cfg, "onnx")(x)
    assert len(calls) == 1 and np.array_equal(first, second)
    assert [p.suffix for p in (cache.parent / "onnx").iterdir()] == [".onnx"]
