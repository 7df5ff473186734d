"""Model size: parameters and multiply-accumulates (MACs) from torch's own FLOP counter."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lmnet.layers.neighborhood_attention import NeighborhoodAttention2d
from lmnet.models._reparam import deploy

__all__ = ["count_parameters", "count_macs", "SizeReport", "size_report", "part_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def part_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters of each top-level child; ``ModuleList`` children are split as ``name[i]``."""
    parts: dict[str, int] = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for i, sub in enumerate(child):
                parts[f"{name}[{i}]"] = count_parameters(sub)
        else:
            parts[name] = count_parameters(child)
    return parts


def count_macs(model: nn.Module, size: int | tuple[int, int] = 256, in_channels: int = 3
               ) -> dict[str, int]:
    """Multiply-accumulates of one forward pass on a ``(1, in_channels, H, W)`` input.

    Returns:
        ``counted``: MACs of convolutions, linear layers, matmuls and SDPA as seen by
        :class:`torch.utils.flop_counter.FlopCounterMode` (its FLOPs / 2);
        ``neighborhood_attention``: MACs of the neighborhood attentions' logits and weighted sums
        (``2 * k^2 * C`` per position), which are elementwise ops the counter does not see;
        ``total``: their sum.
    """
    h, w = (size, size) if isinstance(size, int) else size
    param = next(model.parameters())
    x = torch.zeros(1, in_channels, h, w, dtype=param.dtype, device=param.device)
    na_macs = 0

    def na_hook(module: NeighborhoodAttention2d, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        nonlocal na_macs
        b, hh, ww, c = inputs[0].shape
        na_macs += 2 * module.kernel_size**2 * c * b * hh * ww

    hooks = [m.register_forward_hook(na_hook) for m in model.modules()
             if isinstance(m, NeighborhoodAttention2d)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    counted = counter.get_total_flops() // 2
    return {"counted": counted, "neighborhood_attention": na_macs, "total": counted + na_macs}


@dataclass
class SizeReport:
    """Parameters and MACs of a model in training and deployed (re-parameterised) form."""

    model: str
    input_size: tuple[int, int, int]
    params_train: int
    params_deployed: int
    macs_train: int
    macs_deployed: int
    macs_neighborhood_attention: int
    parts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_report(model: nn.Module, name: str = "", size: int = 256, in_channels: int = 3
                ) -> SizeReport:
    """Count ``model`` as it is and after ``lmnet.deploy`` on a copy (``model`` is not changed)."""
    train_macs = count_macs(model, size, in_channels)
    deployed = deploy(copy.deepcopy(model))
    dep_macs = count_macs(deployed, size, in_channels)
    return SizeReport(
        model=name, input_size=(in_channels, size, size),
        params_train=count_parameters(model), params_deployed=count_parameters(deployed),
        macs_train=train_macs["total"], macs_deployed=dep_macs["total"],
        macs_neighborhood_attention=train_macs["neighborhood_attention"],
        parts=part_parameters(model),
    )
