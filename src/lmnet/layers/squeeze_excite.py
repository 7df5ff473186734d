"""Squeeze-and-Excitation with a hard-sigmoid gate, as in the LM-Net multi-branch module."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Channel gate: ``x * hardsigmoid(W2 relu(W1 mean_hw(x)))``.

    Args:
        channels: number of channels ``c`` of the input ``(B, c, H, W)``.
        reduction: the bottleneck has ``c // reduction`` channels (4 in LM-Net).
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: Kaiming-normal weights (fan-in, ReLU gain); biases as PyTorch's."""
        for conv in (self.reduce, self.expand):
            nn.init.kaiming_normal_(conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))
