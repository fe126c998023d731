"""Paper 002's residual network for benign / malignant histology crops (BreakHis).

The "normal" architecture of paper 002 (section 4.1.3, table 8, figure 41): a head of
a k × k convolution and a 3 × 3 convolution with ``base`` (16) channels, then a 2 × 2
max pooling (``downsample="pool"``) or, in the "stride conv" variant, the first
convolution with stride 2 and no pooling (``downsample="stride"``); five stages of
basic residual blocks (two 3 × 3 convolutions, batch norm, ReLU, identity shortcut, a
1 × 1 projection where the shape changes) with ``base · (1, 2, 4, 8, 16)`` channels
(16 → 256) at 1/2, 1/4, 1/8, 1/16 and 1/32 of the input side (the first block of
stages 2–5 has stride 2); global average pooling, dropout (0.5), one fully connected
layer to the class logits. The paper stacks 5 blocks per stage and uses a 7 × 7 first
convolution (3 × 3 in its "3×3 conv" variant); both are keyword arguments here.

The network returns logits ``(N, n_classes)``; the softmax of the paper's last layer is
applied by the engine (registry ``activation: softmax``) or by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "BreakHisResNet"]

#: channel multipliers of the five residual stages (16 → 256 with ``base=16``)
STAGE_MULTIPLIERS = (1, 2, 4, 8, 16)


class BasicBlock(nn.Module):
    """Two 3 × 3 convolutions with batch norm and a residual shortcut.

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int
        Stride of the first convolution (2 halves the side); the shortcut is a strided
        1 × 1 convolution + batch norm whenever the stride or channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in, H, W)`` → ``(N, out, H / stride, W / stride)``."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class BreakHisResNet(nn.Module):
    """Paper 002's ResNet classifier of histology crops.

    Parameters
    ----------
    in_channels : int
        Input channels (3 = RGB).
    n_classes : int
        Output classes (2: benign, malignant).
    stem_kernel : int
        Side of the first convolution: 7 (paper's normal model) or 3 (its "3×3 conv"
        variant); any odd size is accepted.
    downsample : str
        ``"pool"``: 2 × 2 max pooling after the head (normal model); ``"stride"``: the
        first convolution has stride 2 and there is no pooling ("stride conv").
    base : int
        Channels of the head and of stage 1 (paper: 16); stages have ``base · (1, 2, 4,
        8, 16)``.
    blocks : int or sequence of 5 ints
        Residual blocks per stage (paper: 5).
    dropout : float
        Dropout probability before the fully connected layer (paper: 0.5).

    Notes
    -----
    Input ``(N, in_channels, H, W)`` float32, any ``H, W ≥ 32`` (multiples of 32 keep
    every stage exact); output ``(N, n_classes)`` logits. With ``base=16`` and
    ``blocks=5`` the network has 7.5 M parameters.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 2,
        *,
        stem_kernel: int = 7,
        downsample: str = "pool",
        base: int = 16,
        blocks: int | Sequence[int] = 5,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if downsample not in ("pool", "stride"):
            raise ValueError(f"downsample must be 'pool' or 'stride', got {downsample!r}")
        if stem_kernel < 1 or stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be a positive odd integer, got {stem_kernel}")
        if in_channels < 1 or n_classes < 1 or base < 1:
            raise ValueError(
                f"in_channels, n_classes and base must be >= 1, got {in_channels}, "
                f"{n_classes}, {base}"
            )
        per_stage = (
            [int(blocks)] * len(STAGE_MULTIPLIERS)
            if isinstance(blocks, int)
            else [int(b) for b in blocks]
        )
        if len(per_stage) != len(STAGE_MULTIPLIERS) or min(per_stage) < 1:
            raise ValueError(
                f"blocks must be an integer >= 1 or {len(STAGE_MULTIPLIERS)} such integers, "
                f"got {blocks!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        stride = 2 if downsample == "stride" else 1
        head: list[nn.Module] = [
            nn.Conv2d(in_channels, base, stem_kernel, stride, stem_kernel // 2, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.Conv2d(base, base, 3, 1, 1, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
        ]
        if downsample == "pool":
            head.append(nn.MaxPool2d(2, 2))
        self.head = nn.Sequential(*head)
        stages: list[nn.Module] = []
        channels = base
        for index, (multiplier, n_blocks) in enumerate(
            zip(STAGE_MULTIPLIERS, per_stage, strict=True)
        ):
            out = base * multiplier
            layers: list[nn.Module] = []
            for b in range(n_blocks):
                layers.append(BasicBlock(channels, out, 2 if (b == 0 and index > 0) else 1))
                channels = out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` → pooled features ``(N, base · 16)``."""
        return torch.flatten(self.pool(self.stages(self.head(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` float32 → ``(N, n_classes)`` logits (apply a softmax)."""
        return self.fc(self.dropout(self.features(x)))
