"""lmnet's own operation for OpenVINO: neighborhood attention as one node, run by lmnet's kernel.

Converted with OpenVINO's own tools, the neighborhood attention of LM-Net becomes about 60
whole-map nodes per layer (slices, products, a softmax, sums, concatenations) and took about half
of the deployed model's time under bf16 (``docs/performance.md``). Here every
:class:`~lmnet.layers.neighborhood_attention.NeighborhoodAttentionCore` is converted to one node
(:class:`NeighborhoodAttentionOp`) that OpenVINO's CPU plugin runs by calling back into Python:
the native kernel of :mod:`lmnet.layers.native` on the node's float32 inputs (OpenVINO converts
around it under a bf16 hint), PyTorch's whole-map formulation where that library does not load.
The convolutions and matrix products around it stay OpenVINO's.

Only lmnet's in-process engine uses it (``lmnet predict``, ``evaluate``, ``serve``): an IR holding
this node needs lmnet to run, so ``lmnet export`` writes the plain conversion.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from lmnet.layers.native import native_ops
from lmnet.layers.neighborhood_attention import NeighborhoodAttentionCore, neighborhood_attention_2d

__all__ = ["attention_op_available", "conversion_extensions", "register", "OP_NAME"]

#: The node's type name in an OpenVINO model (and its IR).
OP_NAME = "LmnetNeighborhoodAttention"


def attention_op_available() -> bool:
    """Whether converting with the fused node pays: lmnet's native kernel loads here (without it
    the node would run PyTorch's whole-map operations, slower than OpenVINO's own)."""
    return native_ops(build=False) is not None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
            heads: int, kernel_size: int, scale: float) -> torch.Tensor:
    with torch.inference_mode():
        return neighborhood_attention_2d(q, k, v, heads, kernel_size, rpb, scale)


@functools.cache
def _op_class() -> type:
    """The ``openvino.Op`` subclass, built on first use (importing OpenVINO takes a second)."""
    import openvino as ov

    class NeighborhoodAttentionOp(ov.Op):
        """Inputs ``q, k, v (B, C, H, W)`` and the bias ``(heads, 2k - 1, 2k - 1)``; attributes
        ``heads``, ``kernel_size``, ``scale``; output shaped as ``q``."""

        class_type_info = ov.DiscreteTypeInfo(OP_NAME, "lmnet")

        def __init__(self, inputs: Any = None, attrs: dict | None = None) -> None:
            super().__init__(self, inputs)
            self._attrs = dict(attrs or {"heads": 1, "kernel_size": 3, "scale": 1.0})
            if inputs is not None:
                self.constructor_validate_and_infer_types()

        def validate_and_infer_types(self) -> None:
            self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

        def clone_with_new_inputs(self, new_inputs: Any) -> Any:
            return NeighborhoodAttentionOp(new_inputs, self._attrs)

        def get_type_info(self) -> Any:
            return NeighborhoodAttentionOp.class_type_info

        def visit_attributes(self, visitor: Any) -> bool:
            visitor.on_attributes(self._attrs)
            return True

        def has_evaluate(self) -> bool:
            return True

        def evaluate(self, outputs: Any, inputs: Any) -> bool:
            arrays = [np.asarray(t.data, dtype=np.float32) for t in inputs]
            q, k, v, rpb = (torch.from_numpy(np.require(a, requirements="CW")) for a in arrays)
            out = _attend(q, k, v, rpb, int(self._attrs["heads"]),
                          int(self._attrs["kernel_size"]), float(self._attrs["scale"]))
            outputs[0].shape = inputs[0].shape
            np.copyto(outputs[0].data, out.numpy(), casting="same_kind")
            return True

    return NeighborhoodAttentionOp


def register(core: Any) -> None:
    """Make ``core`` (an ``openvino.Core``) able to read IRs that hold the node."""
    core.add_extension(_op_class())


def conversion_extensions() -> list[Any]:
    """The ``extension=`` list for ``openvino.convert_model`` that turns every
    ``NeighborhoodAttentionCore`` of a PyTorch model into one :class:`NeighborhoodAttentionOp`."""
    from openvino.frontend.pytorch import ConversionExtension, ModuleExtension

    op = _op_class()

    def trace(module: NeighborhoodAttentionCore, target: Any, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, rpb: torch.Tensor | None) -> torch.Tensor:
        # the attributes ride along as constant inputs: a traced call carries only tensors
        if rpb is None:  # no position bias: a zero one, the same mathematics
            size = 2 * module.kernel_size - 1
            rpb = q.new_zeros(module.num_heads, size, size)
        return target(q, k, v, rpb, torch.tensor(module.num_heads),
                      torch.tensor(module.kernel_size), torch.tensor(float(module.scale)))

    def convert(node: Any) -> Any:
        attrs = {"heads": int(node.get_values_from_const_input(4)),
                 "kernel_size": int(node.get_values_from_const_input(5)),
                 "scale": float(node.get_values_from_const_input(6))}
        return op([node.get_input(i) for i in range(4)], attrs).outputs()

    return [ModuleExtension(NeighborhoodAttentionCore, OP_NAME,
                            evaluate=lambda module, q, k, v, rpb, *_: module(q, k, v, rpb),
                            convert=trace),
            ConversionExtension(OP_NAME, convert)]
