"""Baselines the paper compares against, built from MONAI rather than rewritten.

Every builder takes ``in_channels`` and ``n_classes`` and returns a 2-D model mapping
``(B, in_channels, H, W)`` to logits ``(B, n_classes, H, W)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmnet.models._registry import register_model

__all__ = ["FirstOutput"]


class FirstOutput(nn.Module):
    """Wrap a model that returns a list of maps (deep supervision) and keep the first map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def _sides_multiple_of(model: nn.Module, multiple: int, name: str) -> nn.Module:
    """Give ``model`` a clear ``ValueError`` for inputs whose H or W is not a multiple of
    ``multiple`` (where MONAI's network would fail deep inside with a shape mismatch); a forward
    pre-hook, so the weights' names stay MONAI's. ``model.side_multiple`` records it (checks of
    an exported model run sizes it accepts)."""

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        h, w = args[0].shape[-2:]
        if h % multiple or w % multiple:
            near = [max(multiple, round(v / multiple) * multiple) for v in (h, w)]
            raise ValueError(f"{name} needs H and W multiples of {multiple}, got {h} x {w}; the "
                             f"nearest valid size is {near[0]} x {near[1]}")

    model.register_forward_pre_hook(check)
    model.side_multiple = multiple
    return model


def _check(kwargs: dict[str, Any], name: str) -> None:
    if kwargs:
        raise ValueError(f"model {name!r} takes only in_channels and n_classes, "
                         f"got {sorted(kwargs)}")


@register_model("unet", "U-Net (Ronneberger), 64-1024 channels: Table 10 baseline (MONAI BasicUNet)",
                table="10", family="baseline")
def unet(in_channels: int = 3, n_classes: int = 2, **kwargs: Any) -> nn.Module:
    """Ronneberger U-Net widths (64, 128, 256, 512, 1024), ReLU, BatchNorm, transposed-conv up."""
    _check(kwargs, "unet")
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=n_classes,
                     features=(64, 128, 256, 512, 1024, 64), act="relu", norm="batch",
                     dropout=0.0)


@register_model("basic_unet", "MONAI BasicUNet, default widths (32-256)", family="baseline")
def basic_unet(in_channels: int = 3, n_classes: int = 2, **kwargs: Any) -> nn.Module:
    _check(kwargs, "basic_unet")
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=n_classes)


@register_model("unet_plusplus", "UNet++ (MONAI BasicUNetPlusPlus, default widths)",
                family="baseline")
def unet_plusplus(in_channels: int = 3, n_classes: int = 2, **kwargs: Any) -> nn.Module:
    _check(kwargs, "unet_plusplus")
    from monai.networks.nets import BasicUNetPlusPlus

    return FirstOutput(BasicUNetPlusPlus(spatial_dims=2, in_channels=in_channels,
                                         out_channels=n_classes, deep_supervision=False))


@register_model("attention_unet", "Attention U-Net (Oktay), 64-1024 channels (MONAI AttentionUnet)",
                family="baseline")
def attention_unet(in_channels: int = 3, n_classes: int = 2, **kwargs: Any) -> nn.Module:
    _check(kwargs, "attention_unet")
    from monai.networks.nets import AttentionUnet

    return _sides_multiple_of(AttentionUnet(
        spatial_dims=2, in_channels=in_channels, out_channels=n_classes,
        channels=(64, 128, 256, 512, 1024), strides=(2, 2, 2, 2)), 16, "attention_unet")


@register_model("swin_unetr", "Swin UNETR in 2-D, feature size 24 (MONAI SwinUNETR); H, W % 32 == 0",
                family="baseline")
def swin_unetr(in_channels: int = 3, n_classes: int = 2, **kwargs: Any) -> nn.Module:
    _check(kwargs, "swin_unetr")
    from monai.networks.nets import SwinUNETR

    return _sides_multiple_of(SwinUNETR(in_channels=in_channels, out_channels=n_classes,
                                        spatial_dims=2, feature_size=24), 32, "swin_unetr")


@register_model("dynunet", "nnU-Net's network (MONAI DynUNet), 2-D plan for 256x256, 6 stages",
                family="baseline")
def dynunet(in_channels: int = 3, n_classes: int = 2, **kwargs: Any) -> nn.Module:
    _check(kwargs, "dynunet")
    from monai.networks.nets import DynUNet

    strides = [[1, 1]] + [[2, 2]] * 5
    return _sides_multiple_of(DynUNet(
        spatial_dims=2, in_channels=in_channels, out_channels=n_classes,
        kernel_size=[[3, 3]] * 6, strides=strides, upsample_kernel_size=strides[1:],
        filters=[32, 64, 128, 256, 512, 512], norm_name="instance", deep_supervision=False,
        res_block=False), 32, "dynunet")
