"""ShallowNet of paper 004 (Otálora et al. 2018) and its direct + area fusion.

`ShallowNet`: "a 4-layer CNN consisting of 3×3 convolutional kernels, followed by batch
normalization, ReLU activation, dropout of 0.25 and max-pooling of a 2×2 neighborhood,
ending in a dense layer with a linear activation" — one real number per patch. The
paper's net has 2.7 M parameters on 224² patches; the default widths here (8-16-32-32
on 96² patches, 16.5 k parameters per branch) fit a CPU training budget.

`MagnificationFusion` holds the paper's two regressors, one trained to regress the
magnification directly (it outputs log2 of it), one to regress the mean nucleus area
(it outputs the natural log of the area in px²), and combines them as the paper's best
model does: the area is mapped to the class whose training-set mean area is closest,
and ``fused = α · m_area + (1 − α) · m_direct`` with α = 0.2.

Tensor contract: input ``(N, 3, P, P)`` float32 RGB / 255 with ``P = patch_size``;
`ShallowNet` returns ``(N, out_features)``; `MagnificationFusion` returns ``(N, 3)``:
fused, direct and area-derived magnification (objective power; the area-derived one is
a class value). `MagnificationFusion.area_px` gives the regressed mean nucleus area.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MagnificationFusion", "ShallowNet"]

#: the paper's magnification classes, in the order of ``class_areas_px``
MAGNIFICATIONS = (5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 40.0)


class ShallowNet(nn.Module):
    """4 × (3×3 conv → BN → ReLU → 2×2 max-pool → dropout 0.25) → linear.

    The pool comes before the dropout: a max over dropout-scaled values is biased
    upwards in training (by up to 1 / (1 − p) per block), so with the paper's listed
    order the eval-mode outputs drifted far below the training ones (measured: every
    held-out patch read 2-3 classes too low).

    Parameters
    ----------
    in_channels : int
        Input channels (3 = RGB).
    widths : sequence of 4 int
        Channels of the four blocks.
    patch_size : int
        Input side P, px; a multiple of 16 (four poolings). The dense layer sees
        ``widths[-1] · (P / 16)²`` features, so the net takes only this size.
    out_features : int
        Outputs of the final linear layer.
    dropout : float
        Dropout probability after every block (paper: 0.25).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (8, 16, 32, 32),
        patch_size: int = 96,
        out_features: int = 1,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive integers, got {widths}")
        if patch_size < 16 or patch_size % 16:
            raise ValueError(f"patch_size must be a positive multiple of 16, got {patch_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout(dropout),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.patch_size = patch_size
        self.head = nn.Linear(previous * (patch_size // 16) ** 2, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(
                f"ShallowNet takes {self.patch_size}² patches, got {tuple(x.shape[-2:])}"
            )
        return self.head(self.features(x).flatten(1))


class MagnificationFusion(nn.Module):
    """Direct magnification regressor + nucleus-area regressor, fused (paper 004).

    Parameters
    ----------
    class_areas_px : sequence of 7 float
        Mean nucleus area (px²) of each class of (5, 8, 10, 15, 20, 30, 40×) in the
        training set; the area branch picks the class whose mean is closest.
    alpha : float
        Weight of the area-derived magnification (paper: 0.2); the direct one gets
        ``1 − alpha``.
    in_channels, widths, patch_size, dropout
        Of both `ShallowNet` branches.
    """

    def __init__(
        self,
        class_areas_px: Sequence[float] = (12.0, 31.0, 48.0, 108.0, 192.0, 432.0, 768.0),
        alpha: float = 0.2,
        in_channels: int = 3,
        widths: Sequence[int] = (8, 16, 32, 32),
        patch_size: int = 96,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        areas = [float(a) for a in class_areas_px]
        if len(areas) != len(MAGNIFICATIONS) or min(areas) <= 0:
            raise ValueError(
                f"class_areas_px must be {len(MAGNIFICATIONS)} positive areas, got {areas}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.direct = ShallowNet(in_channels, widths, patch_size, 1, dropout)
        self.area = ShallowNet(in_channels, widths, patch_size, 1, dropout)
        # constants, not learnt; kept out of the state dict (they live in the kwargs)
        self.register_buffer("class_areas", torch.tensor(areas), persistent=False)
        self.register_buffer("classes", torch.tensor(MAGNIFICATIONS), persistent=False)

    class_areas: torch.Tensor
    classes: torch.Tensor

    def area_px(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` regressed mean nucleus area, px² at the input's resolution."""
        return torch.exp(self.area(x)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direct = torch.exp2(self.direct(x)[:, 0])
        area = self.area_px(x)
        nearest = (area[:, None] - self.class_areas[None, :]).abs().argmin(dim=1)
        from_area = self.classes[nearest]
        fused = self.alpha * from_area + (1.0 - self.alpha) * direct
        return torch.stack([fused, direct, from_area], dim=1)
