"""Tumour-tissue networks: the paper-001 cancer / stroma / background FCN and a patch classifier.

`TissueFCN` follows "Semantic Segmentation with Histological Image Data: Cancer Cell vs.
Stroma" (paper 001): the first blocks of VGG16 (3×3 convolutions + ReLU, 2×2 max pools)
as encoder, then one 2×2 stride-2 transpose convolution per pool back to the input size,
each followed by 3×3 convolutions, and a 1×1 convolution to 3 class logits (cancer,
stroma, background; apply a softmax). The widths are arguments so that tests build a tiny
one; ``widths=(64, 128, 256)`` with ``convs=(2, 2, 3)`` is VGG16 up to its third pool.

`PatchClassifier` is a small VGG-style classifier of RGB patches (the IDC tumour-vs-not
patch model of papers 000-002): ``len(widths)`` blocks of two 3×3 convolutions (batch
norm, ReLU) and a 2×2 max pool, global average pooling, dropout and one linear layer to
``n_classes`` logits (apply a softmax). Global pooling lets it take any patch side
≥ ``2**len(widths)``.

Tensor contract (`napari_histo_ai.models.spec`): input float32 ``(N, C, H, W)``;
`TissueFCN` returns ``(N, n_classes, H, W)`` logits (``H``, ``W`` multiples of
``size_multiple``), `PatchClassifier` ``(N, n_classes)`` logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PatchClassifier", "TissueFCN"]

#: 3×3 convolutions per VGG16 block
_VGG16_CONVS = (2, 2, 3, 3, 3)


def _check_widths(name: str, values: Sequence[int]) -> tuple[int, ...]:
    out = tuple(values)
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in out):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}")
    return out


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class TissueFCN(nn.Module):
    """VGG16-style encoder + transpose-convolution decoder giving per-pixel class logits.

    Parameters
    ----------
    in_channels : int
        Input channels C (3 = RGB).
    n_classes : int
        Output channels K (3: cancer, stroma, background).
    widths : sequence of int
        Channels of the encoder blocks; block ``i < len(widths) - 1`` ends with a 2×2 max
        pool, so there are ``len(widths) - 1`` pools (paper 001's final model: VGG16 to
        before its 3rd pool, ``(64, 128, 256)``).
    convs : sequence of int, optional
        3×3 convolutions per encoder block; default VGG16's ``(2, 2, 3, 3, 3)`` cut to
        ``len(widths)`` (at most 5 blocks then).
    decoder_convs : int
        3×3 convolutions after each transpose convolution.

    Notes
    -----
    Output size equals input size when ``H`` and ``W`` are multiples of
    ``size_multiple = 2**(len(widths) - 1)``. The receptive-field radius of a
    ``(64, 128, 256)`` net is about 40 input pixels.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 3,
        widths: Sequence[int] = (64, 128, 256),
        convs: Sequence[int] | None = None,
        decoder_convs: int = 1,
    ) -> None:
        super().__init__()
        _positive("in_channels", in_channels)
        _positive("n_classes", n_classes)
        widths = _check_widths("widths", widths)
        if convs is None and len(widths) > len(_VGG16_CONVS):
            raise ValueError(f"give convs for more than {len(_VGG16_CONVS)} widths {widths!r}")
        convs = _check_widths("convs", convs if convs is not None else _VGG16_CONVS[: len(widths)])
        if len(convs) != len(widths):
            raise ValueError(f"convs {convs!r} needs one entry per width in {widths!r}")
        if not isinstance(decoder_convs, int) or decoder_convs < 0:
            raise ValueError(f"decoder_convs must be an integer ≥ 0, got {decoder_convs!r}")
        self.size_multiple = 2 ** (len(widths) - 1)
        blocks: list[nn.Module] = []
        c = in_channels
        for i, (w, n) in enumerate(zip(widths, convs, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(n):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
            blocks.append(nn.Sequential(*layers))
        self.encoder = nn.Sequential(*blocks)
        up: list[nn.Module] = []
        for w in reversed(widths[:-1]):
            layers = [nn.ConvTranspose2d(c, w, 2, stride=2), nn.ReLU(inplace=True)]
            for _ in range(decoder_convs):
                layers += [nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True)]
            up.append(nn.Sequential(*layers))
            c = w
        self.decoder = nn.Sequential(*up)
        self.head = nn.Conv2d(c, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` → ``(N, n_classes, H, W)`` logits."""
        return self.head(self.decoder(self.encoder(x)))


class PatchClassifier(nn.Module):
    """Small VGG-style patch classifier (one class-logit vector per patch).

    Parameters
    ----------
    in_channels : int
        Input channels C.
    n_classes : int
        Output logits K (2: not tumour, tumour).
    widths : sequence of int
        Channels of the convolution blocks (two 3×3 conv + BN + ReLU, then a 2×2 max
        pool each).
    dropout : float
        Dropout probability before the linear layer (training only).
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 2,
        widths: Sequence[int] = (16, 32, 64),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        _positive("in_channels", in_channels)
        _positive("n_classes", n_classes)
        widths = _check_widths("widths", widths)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            for _ in range(2):
                layers += [
                    nn.Conv2d(c, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` → ``(N, n_classes)`` logits."""
        features = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(features))
