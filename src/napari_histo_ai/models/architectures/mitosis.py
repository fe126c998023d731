"""Paper 000's mitosis networks: the "basic convnet" tile classifier and a dense FCN.

Pearce, "Convolutional Neural Networks and the Analysis of Cancer Imagery" (paper 000):
each convolutional block is two 3×3 convolutions with batch normalisation and ReLU,
then a 2×2 max-pool; the classifier is one affine layer with dropout, then the binary
output.

`BasicConvNet` is that network as a tile classifier (``(N, 3, H, W) → (N, n_classes)``
logits; the registry applies a softmax over the two classes *no mitosis*, *mitosis*).

`MitosisFCN` is the fully convolutional variant the paper tried (its appendix: every
convolutional block and the dense layer feed a deconvolution path that scales back to
the input size, FCN-style). Here the dense layer is a 1×1 convolution (so the network
takes any input size), each level has a 1×1 score head, and the scores are fused coarse
to fine by bilinear 2× upsampling and addition (FCN-8s). The output is one logit per
input pixel (``(N, 1, H, W)``; sides must be multiples of ``2 ** (len(filters) - 1)``);
its sigmoid is the mitosis probability map trained against ``exp(-a·d)`` targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BasicConvNet", "MitosisFCN", "conv_block"]


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3×3 convolutions (zero padding 1), each with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _check_filters(filters: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(f) for f in filters)
    if not out or any(f < 1 for f in out):
        raise ValueError(f"filters must be a non-empty list of positive ints, got {filters!r}")
    return out


class BasicConvNet(nn.Module):
    """Tile classifier: conv blocks + max-pool, one dense layer with dropout, logits.

    Parameters
    ----------
    in_channels : int
        Input channels (3 = RGB).
    filters : sequence of int
        Channels of each block (each block: 2 × (3×3 conv, BN, ReLU), 2×2 max-pool).
    dense : int
        Width of the affine layer.
    dropout : float
        Dropout probability before the classifier.
    n_classes : int
        Outputs (2: no mitosis, mitosis; apply a softmax).
    pooled : int
        Side of the adaptive average pool before the dense layer, so any input side
        ≥ ``2 ** len(filters)`` px is accepted (the default 24 px tile gives 6 × 6 maps,
        pooled to 3 × 3).

    Notes
    -----
    Input ``(N, in_channels, H, W)`` float32; output ``(N, n_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 3,
        filters: Sequence[int] = (16, 32),
        dense: int = 64,
        dropout: float = 0.5,
        n_classes: int = 2,
        pooled: int = 3,
    ) -> None:
        super().__init__()
        widths = _check_filters(filters)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if n_classes < 1 or dense < 1 or pooled < 1:
            raise ValueError(
                f"n_classes, dense and pooled must be ≥ 1, got {n_classes}, {dense}, {pooled}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [conv_block(channels, width), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.dense = nn.Linear(channels * pooled * pooled, dense)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dense, n_classes)
        self.min_size = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.min_size or x.shape[-2] < self.min_size:
            raise ValueError(
                f"BasicConvNet needs inputs of at least {self.min_size} px a side, got "
                f"{tuple(x.shape[-2:])}"
            )
        y = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(F.relu(self.dense(y))))


class MitosisFCN(nn.Module):
    """Fully convolutional mitosis map: conv blocks, 1×1 dense layer, fused score heads.

    Parameters
    ----------
    in_channels : int
        Input channels (3 = RGB).
    filters : sequence of int
        Channels of each level; level ``i`` works at ``1 / 2**i`` of the input size
        (max-pool between levels).
    dense : int
        Channels of the 1×1 "dense" layer on the coarsest level.
    dropout : float
        Channel dropout after the dense layer (training only).
    out_channels : int
        Output maps (1: mitosis logit).

    Notes
    -----
    Input ``(N, in_channels, H, W)`` with ``H`` and ``W`` multiples of
    `size_multiple` (``2 ** (len(filters) - 1)``); output ``(N, out_channels, H, W)``
    logits. Receptive field of the default (16, 32, 64): 32 px (radius ≈ 16 px, plus
    the bilinear upsampling's 2-4 px).
    """

    def __init__(
        self,
        in_channels: int = 3,
        filters: Sequence[int] = (16, 32, 64),
        dense: int = 64,
        dropout: float = 0.1,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        widths = _check_filters(filters)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if out_channels < 1 or dense < 1:
            raise ValueError(f"out_channels and dense must be ≥ 1, got {out_channels}, {dense}")
        self.blocks = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.blocks.append(conv_block(channels, width))
            channels = width
        self.dense = nn.Sequential(
            nn.Conv2d(channels, dense, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout)
        )
        self.score_dense = nn.Conv2d(dense, out_channels, 1)
        self.scores = nn.ModuleList(nn.Conv2d(w, out_channels, 1) for w in widths[:-1])
        self.size_multiple = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(
                f"MitosisFCN needs input sides that are multiples of {m}, got {tuple(x.shape[-2:])}"
            )
        skips: list[torch.Tensor] = []
        y = x
        for i, block in enumerate(self.blocks):
            if i:
                y = F.max_pool2d(y, 2)
            y = block(y)
            skips.append(y)
        out = self.score_dense(self.dense(y))
        for skip, head in zip(reversed(skips[:-1]), reversed(list(self.scores)), strict=True):
            out = F.interpolate(out, scale_factor=2.0, mode="bilinear", align_corners=False)
            out = out + head(skip)
        return out
