"""LM-Net: A Light-weight and Multi-scale Network for Medical Image Segmentation.

Lu, She, Wang, Huang. The network follows the reference description in the project's architecture
spec: a multi-branch CNN encoder, a Global Feature Transformer bridge over a pyramid of all encoder
stages, multi-scale skips each refined by a Local Feature Transformer (neighborhood attention), and a
decoder of multi-branch blocks. Every ablation of the paper (Tables 6, 8, 9, 10) is a config switch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmnet._dataclass import dataclass_from_dict
from lmnet.layers.multibranch import DEFAULT_BRANCHES, MultiBranchBlock, parse_branches
from lmnet.layers.pyramid import LocalPyramidSkip, Up2Conv
from lmnet.layers.transformer import GlobalFeatureTransformer, LocalFeatureTransformer
from lmnet.models._hub import default_pretrained_cfg, save_pretrained
from lmnet.models._registry import register_model

__all__ = ["LMNetConfig", "LMNet", "BRIDGES", "SKIPS"]

BRIDGES = ("multi", "single", "aspp", "none")
SKIPS = ("multi", "single")


@dataclass
class LMNetConfig:
    """Configuration of LM-Net and its ablations. Defaults give the network of the paper."""

    in_channels: int = 3            # input image channels
    n_classes: int = 2              # output logit maps; 1 = one sigmoid map, 2 = softmax bg/lesion
    width: int = 12                 # base width C; stage widths are (C, 2C, 4C, 8C, 16C)
    branches: tuple[str, ...] = field(default_factory=lambda: DEFAULT_BRANCHES)  # Table 6
    bridge: str = "multi"           # Table 8: multi (GFT) | single | aspp | none
    skip: str = "multi"             # Table 9: multi (local pyramids) | single (U-Net skip)
    lft: bool = True                # Table 9/10: Local Feature Transformer on every skip
    num_heads: int = 12             # heads of the GFT and of each LFT
    na_kernel: int = 3              # neighborhood attention window (odd)
    position_bias: bool = True      # NAT relative position bias in the LFT
    mlp_ratio: float = 2.0          # transformer MLP width / token width
    drop: float = 0.1               # dropout in the transformer MLPs

    def __post_init__(self) -> None:
        if isinstance(self.branches, str):
            self.branches = tuple(b for b in self.branches.replace("+", ",").split(",") if b)
        self.branches = tuple(self.branches)
        parse_branches(self.branches)  # raises ValueError with a clear message
        for name in ("in_channels", "n_classes", "width", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.bridge not in BRIDGES:
            raise ValueError(f"bridge must be one of {BRIDGES}, got {self.bridge!r}")
        if self.skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {self.skip!r}")
        if self.na_kernel < 1 or self.na_kernel % 2 == 0:
            raise ValueError(f"na_kernel must be a positive odd integer, got {self.na_kernel}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {self.drop}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        uses_heads = self.lft or self.bridge in ("multi", "single")
        if uses_heads and self.width % self.num_heads:
            raise ValueError(
                f"width {self.width} must be a multiple of num_heads {self.num_heads} "
                "(the transformers split every width into that many heads)"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """``f = (C, 2C, 4C, 8C, 16C)``."""
        return tuple(self.width * 2**i for i in range(5))

    @property
    def min_size(self) -> int:
        """Smallest valid side: a multiple of 16 whose H/8 map holds one attention window."""
        need = 8 * self.na_kernel if self.lft else 16
        return 16 * -(-need // 16)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LMNetConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming the valid ones."""
        return dataclass_from_dict(cls, values, "LM-Net option(s)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["branches"] = list(self.branches)
        return d


def _stage(c_in: int, c_exp: int, c_out: int, branches: tuple[str, ...]) -> nn.Sequential:
    """Two multi-branch blocks: ``MB(c_in, c_exp, c_out)``, ``MB(c_out, c_exp, c_out)``."""
    return nn.Sequential(MultiBranchBlock(c_in, c_exp, c_out, branches),
                         MultiBranchBlock(c_out, c_exp, c_out, branches))


class LMNet(nn.Module):
    """LM-Net: ``(B, in_channels, H, W) -> (B, n_classes, H, W)`` logits, H and W multiples of 16.

    Args:
        config: an :class:`LMNetConfig`; keyword arguments override its fields.
    """

    def __init__(self, config: LMNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = LMNetConfig.from_dict(overrides)
        elif overrides:
            config = LMNetConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        f, br = config.widths, config.branches

        # Encoder.
        self.stage1 = _stage(config.in_channels, f[1], f[0], br)
        self.down1 = nn.Conv2d(f[0], f[1], 3, stride=2, padding=1)
        self.stage2 = _stage(f[1], f[2], f[1], br)
        self.down2 = nn.Conv2d(f[1], f[2], 3, stride=2, padding=1)
        self.stage3 = _stage(f[2], f[3], f[2], br)
        self.down3 = nn.Conv2d(f[2], f[3], 3, stride=2, padding=1)
        self.stage4 = _stage(f[3], f[4], f[3], br)
        self.down4 = nn.Conv2d(f[3], f[4], 3, stride=2, padding=1)

        # Bridge (Table 8).
        if config.bridge == "multi":
            self.bridge: nn.Module | None = GlobalFeatureTransformer(
                f, f[4], num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, drop=config.drop)
        elif config.bridge == "single":
            self.bridge = GlobalFeatureTransformer(
                f, f[4], dim=sum(f), num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                drop=config.drop, multiscale=False)
        elif config.bridge == "aspp":
            from monai.networks.blocks import SimpleASPP

            self.bridge = SimpleASPP(2, f[4], f[4] // 4, kernel_sizes=(1, 3, 3, 3),
                                     dilations=(1, 2, 4, 6))
        else:
            self.bridge = None

        # Skips s1..s4 at levels x4..x1 (Table 9) and their LFTs.
        levels = (3, 2, 1, 0)
        if config.skip == "multi":
            self.skips = nn.ModuleList(LocalPyramidSkip(f[:4], t) for t in levels)
        else:
            self.skips = None
        if config.lft:
            self.lfts = nn.ModuleList(
                LocalFeatureTransformer(f[t], config.num_heads, config.na_kernel, config.mlp_ratio,
                                        config.drop, config.position_bias) for t in levels)
        else:
            self.lfts = None

        # Decoder.
        self.ups = nn.ModuleList(Up2Conv(f[t + 1], f[t]) for t in levels)
        self.decoders = nn.ModuleList(_stage(f[t], f[t + 1], f[t], br) for t in levels)
        self.head = nn.Conv2d(f[0], config.n_classes, 1)

    # -- forward ---------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the expected shape if ``x`` cannot go through the network."""
        c = self.config
        if x.ndim != 4:
            raise ValueError(f"expected a (B, {c.in_channels}, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != c.in_channels:
            raise ValueError(
                f"expected {c.in_channels} input channels, i.e. shape (B, {c.in_channels}, H, W); "
                f"got {tuple(x.shape)}"
            )
        h, w = int(x.shape[2]), int(x.shape[3])
        bad = [s for s in (h, w) if s % 16 or s < c.min_size]
        if bad:
            def near(s: int) -> int:
                return max(c.min_size, 16 * round(s / 16))
            raise ValueError(
                f"spatial size {h}x{w} is not valid: H and W must be multiples of 16 and at least "
                f"{c.min_size}; expected (B, {c.in_channels}, H, W), e.g. {near(h)}x{near(w)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)
        x1 = self.stage1(x)
        x2 = self.stage2(self.down1(x1))
        x3 = self.stage3(self.down2(x2))
        x4 = self.stage4(self.down3(x3))
        x5 = self.down4(x4)
        feats = [x1, x2, x3, x4]

        if self.config.bridge in ("multi", "single"):
            y = self.bridge([*feats, x5])
        elif self.bridge is not None:
            y = self.bridge(x5)
        else:
            y = x5

        for i, t in enumerate((3, 2, 1, 0)):
            s = self.skips[i](feats) if self.skips is not None else feats[t]
            if self.lfts is not None:
                s = self.lfts[i](s)
            y = self.decoders[i](self.ups[i](y) + s)
        return self.head(y)

    # -- deployment ------------------------------------------------------------------------------
    @torch.no_grad()
    def save_pretrained(self, folder: str | Path, pretrained_cfg: dict[str, Any] | None = None,
                        card: str | None = None, dtype: torch.dtype = torch.float16) -> Path:
        """Write this model as a pretrained folder (``config.json``, ``model.safetensors``,
        ``README.md`` if ``card``), re-parameterised, for ``lmnet.from_pretrained(folder)``.
        ``pretrained_cfg`` defaults to 256 x 256 input, ImageNet normalisation, threshold 0.5."""
        c = self.config
        return save_pretrained(self, folder, "lmnet", c.to_dict(),
                               pretrained_cfg or default_pretrained_cfg(c.in_channels, c.n_classes),
                               card=card, dtype=dtype)

    def reparameterize(self) -> "LMNet":
        """Fold every multi-branch module (and foldable BatchNorm) in place; idempotent.

        The model is put in eval mode; outputs match the training form in eval mode.
        """
        self.eval()
        for module in list(self.modules()):
            if module is not self and hasattr(module, "reparameterize"):
                module.reparameterize()
        return self

    @property
    def deployed(self) -> bool:
        """True once the multi-branch modules are folded."""
        return all(m.deployed for m in self.modules() if isinstance(m, MultiBranchBlock))


def _build(defaults: dict[str, Any], kwargs: dict[str, Any]) -> LMNet:
    return LMNet(LMNetConfig.from_dict({**defaults, **kwargs}))


def _register(name: str, description: str, table: str, **defaults: Any) -> None:
    def builder(**kwargs: Any) -> LMNet:
        return _build(defaults, kwargs)

    builder.__doc__ = description
    register_model(name, description, table)(builder)


_register("lmnet", "LM-Net as in the paper: MB encoder, GFT bridge, multi-scale skips + LFT", "")
# Table 6: branch sets of the multi-branch module (any subset: create_model("lmnet", branches=...)).
for _branches in (("3x3",), ("5x5",), ("7x7",), ("5x5d2",), ("3x3", "5x5"),
                  ("5x5", "3x3", "3x1", "1x3", "5x5d2"), ("5x5", "3x3", "3x1", "1x3", "7x7")):
    _register("lmnet_mb_" + "_".join(_branches),
              f"LM-Net with depthwise branches {{{', '.join(_branches)}}}", "6",
              branches=_branches)
# Table 8: bridges. Table 10's "+ LFT" row is lmnet_bridge_none, its "+ GFT" row lmnet_skip_single
# and its "+ both" row lmnet itself.
_register("lmnet_bridge_none", "LM-Net without bridge (x5 straight to the decoder); T10 '+LFT'",
          "8,10", bridge="none")
_register("lmnet_bridge_aspp", "LM-Net with an ASPP bridge (MONAI SimpleASPP)", "8", bridge="aspp")
_register("lmnet_bridge_single", "LM-Net with a single-scale transformer bridge on x5", "8",
          bridge="single")
# Table 9: skips.
_register("lmnet_skip_single", "LM-Net with plain U-Net skips, no LFT; T10 '+GFT'", "9,10",
          skip="single", lft=False)
_register("lmnet_skip_single_lft", "LM-Net with plain U-Net skips refined by LFT", "9",
          skip="single", lft=True)
_register("lmnet_skip_multi", "LM-Net with multi-scale skips, no LFT", "9", skip="multi", lft=False)
# Table 10: the multi-branch backbone alone (the plain U-Net baseline is 'unet').
_register("lmnet_t10_mb", "MB backbone: plain skips, no LFT, no bridge; T10 '+multi-branch'", "10",
          skip="single", lft=False, bridge="none")
