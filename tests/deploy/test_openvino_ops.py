"""The fused neighborhood-attention node for OpenVINO (``lmnet.deploy.openvino_ops``): the same
logits as PyTorch, one node per attention layer, cached apart from the plain conversion, and the
plain conversion where the native kernel does not load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lmnet
from lmnet.deploy.backends import engine_available
from lmnet.layers import neighborhood_attention as na
from lmnet.layers.native import native_ops

pytestmark = pytest.mark.skipif(not engine_available("openvino"),
                                reason="needs openvino (the 'test' extra)")

# built first, as any training on the machine builds it: inference only loads a built library
NATIVE = native_ops() is not None


class _TwoAttentions(nn.Module):
    """Two neighborhood attentions on a channels-first map: LM-Net's 12 heads of one channel with
    a 7 x 7 window and a position bias, then 2 heads of 6 channels, 3 x 3, no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 12, 3, padding=1)
        self.a = na.NeighborhoodAttention2d(12, 12, 7)
        self.b = na.NeighborhoodAttention2d(12, 2, 3, bias=False)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.inp(x).permute(0, 2, 3, 1)
        return self.out(self.b(self.a(t)).permute(0, 3, 1, 2))


def _with_reference(model: nn.Module, size: int) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        return model, x, model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return _with_reference(_TwoAttentions().eval(), 20)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


@pytest.fixture(scope="module")
def _shared_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def warm_cache(_shared_folder, monkeypatch):
    """One cache for the tests that do not count conversions: each IR converted once."""
    monkeypatch.setenv("LMNET_CACHE_DIR", str(_shared_folder))


def _op_types(ov_model) -> list[str]:
    return [op.get_type_name() for op in ov_model.get_ops()]


def _record_fused_flag(monkeypatch, module, name: str) -> list[bool]:
    """Wrap ``module.name(model, in_channels, size, fused_attention)``: the list of the
    ``fused_attention`` of each call."""
    calls: list[bool] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a[3]) or real(*a))
    return calls


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_fused_conversion_has_one_node_per_attention_and_same_logits(small, cache):
    from lmnet.deploy import openvino_ops
    from lmnet.deploy.backends import openvino_runner
    from lmnet.deploy.convert import convert_to_openvino

    model, x, reference = small
    fused = convert_to_openvino(model, 3, 20, fused_attention=True)
    # the caller's model is left as it was (OpenVINO leaves the modules it replaced patched):
    # it still converts with OpenVINO's own operations, none of lmnet's node
    plain = convert_to_openvino(model, 3, 20)
    assert _op_types(fused).count(openvino_ops.OP_NAME) == 2
    assert openvino_ops.OP_NAME not in _op_types(plain)
    assert len(_op_types(fused)) < len(_op_types(plain)) / 2  # the whole-map nodes are gone
    run = openvino_runner(model, 3, 20, fused_attention=True)
    _close(run(x), reference)
    for shape in [(2, 3, 20, 20), (1, 3, 16, 28)]:  # batch and size stay dynamic
        y = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        with torch.inference_mode():
            _close(run(y), model(torch.from_numpy(y)).numpy())


@pytest.mark.slow
def test_lmnet_fused_in_openvino_same_logits_as_pytorch(cache):
    from lmnet.deploy import openvino_ops
    from lmnet.deploy.backends import openvino_runner
    from lmnet.deploy.convert import cached_openvino_model

    torch.manual_seed(0)
    model, x, reference = _with_reference(lmnet.deploy(lmnet.create_model("lmnet").eval()), 64)
    layers = sum(isinstance(m, na.NeighborhoodAttentionCore) for m in model.modules())
    fused = cached_openvino_model(model, 3, 64, fused_attention=True)
    assert layers > 0 and _op_types(fused).count(openvino_ops.OP_NAME) == layers
    _close(openvino_runner(model, 3, 64, fused_attention=True)(x), reference)


def test_fused_model_is_cached_apart_and_read_back(small, cache, monkeypatch):
    from lmnet.deploy import convert as conversion
    from lmnet.deploy.backends import openvino_runner

    model, x, reference = small
    calls = _record_fused_flag(monkeypatch, conversion, "convert_to_openvino")
    first = openvino_runner(model, 3, 20, fused_attention=True)(x)
    second = openvino_runner(model, 3, 20, fused_attention=True)(x)  # read back: needs the op
    openvino_runner(model, 3, 20, fused_attention=False)(x)
    assert calls == [True, False]
    assert np.array_equal(first, second)
    names = sorted(p.name for p in cache.glob("*.xml"))
    assert len(names) == 2 and sum(n.endswith("_fused_attention.xml") for n in names) == 1


def test_default_is_fused_only_where_the_native_kernel_loads(small, warm_cache, monkeypatch):
    from lmnet.deploy import backends, openvino_ops

    model, x, reference = small
    calls = _record_fused_flag(monkeypatch, backends, "cached_openvino_model")
    _close(backends.openvino_runner(model, 3, 20)(x), reference)
    monkeypatch.setattr(openvino_ops, "attention_op_available", lambda: False)
    _close(backends.openvino_runner(model, 3, 20)(x), reference)
    assert calls == [NATIVE, False]


def test_node_without_native_kernel_computes_the_same(small, warm_cache, monkeypatch):
    """Where the library does not load, the node runs PyTorch's whole-map formulation."""
    from lmnet.deploy.backends import openvino_runner

    model, x, reference = small
    run = openvino_runner(model, 3, 20, fused_attention=True)
    monkeypatch.setattr(na, "NATIVE_FORWARD", False)
    _close(run(x), reference)


def test_bf16_hint_runs_the_fused_model(small, warm_cache):
    """Under a bf16 hint OpenVINO converts around the float32 node; on a CPU without bf16 it
    computes in fp32. The logits stay close to PyTorch's either way (bf16: about 3 digits)."""
    from lmnet.deploy.backends import openvino_runner

    model, x, reference = small
    out = openvino_runner(model, 3, 20, precision="bf16", fused_attention=True)(x)
    assert out.shape == reference.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out, reference, atol=0.05 * float(np.abs(reference).max()))


def test_an_openvino_whose_decoder_differs_converts_the_module_itself(small, monkeypatch, caplog):
    """Conversions skip the trace check through OpenVINO's TorchScript decoder; where that
    decoder cannot be built so (another OpenVINO), ``convert_model`` traces the module as before:
    with the attention fused (the path with extensions to pass on), the same nodes and logits."""
    import logging

    import openvino as ov
    from openvino.frontend.pytorch import ts_decoder

    from lmnet.deploy import openvino_ops
    from lmnet.deploy.convert import convert_to_openvino

    model, x, reference = small
    with caplog.at_level(logging.DEBUG, logger="lmnet.deploy.convert"):
        direct = _op_types(convert_to_openvino(model, 3, 20, fused_attention=True))
    assert "convert_model traces" not in caplog.text  # this OpenVINO takes the decoder
    caplog.clear()

    class Older(ts_decoder.TorchScriptPythonDecoder):  # an OpenVINO without trace_kwargs
        def __init__(self, *args, trace_kwargs=None, **kwargs):
            if trace_kwargs is not None:
                raise TypeError("unexpected keyword argument 'trace_kwargs'")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ts_decoder, "TorchScriptPythonDecoder", Older)
    core = ov.Core()
    openvino_ops.register(core)
    with caplog.at_level(logging.DEBUG, logger="lmnet.deploy.convert"):
        converted = convert_to_openvino(model, 3, 20, fused_attention=True)
    assert "convert_model traces" in caplog.text
    assert sorted(_op_types(converted)) == sorted(direct) and openvino_ops.OP_NAME in direct
    # fp32: OpenVINO's CPU default is bf16 where the CPU has it
    _close(core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0], reference)
