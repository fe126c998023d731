"""A light one-stage mass detector with a mask head, for whole mammograms (paper 002).

Paper 002 detects breast masses with Mask R-CNN (ResNet-101 backbone, region proposal
network, RoIAlign, box / class / mask heads) on DDSM. torchvision is not available
here and 115 films on a CPU cannot train a ResNet-101, so `MassDetector` is a
CenterNet-style ("Objects as Points", Zhou et al. 2019) dense network that fits the
engine's ``boxes`` output without any region-of-interest machinery:

* a fixed average-pool stem (``downsample`` input px per feature px, anti-aliased);
* a small strided CNN encoder (strides 2, 4, 8 after the stem) and a feature-pyramid
  decoder back to stride 2 after the stem;
* one shared 3 × 3 head giving, per output pixel, ``n_classes`` centre-heatmap logits
  (benign, malignant), one lesion-mask logit and the box height and width.

Output channel layout (``(N, n_classes + 3, H / s, W / s)``, ``s = 2 * downsample``):

=================  ==========================================================
``0 … n_classes-1`` class centre heatmaps, logits (sigmoid: centre probability)
``n_classes``       lesion mask, logit (sigmoid: pixel inside a lesion)
``n_classes + 1``   box height, output pixels (already positive, ``exp`` inside)
``n_classes + 2``   box width, output pixels
=================  ==========================================================

so a registry entry reads ``boxes`` from the heatmap channels with ``size_channels`` on
the last two, and a ``mask`` output from the mask channel; the engine applies the
sigmoid to the probability channels only.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

__all__ = ["MassDetector"]

#: clamp of the raw log-size (output px): sizes stay in [e^-3, e^6] ≈ [0.05, 403]
LOG_SIZE_RANGE = (-3.0, 6.0)
#: initial centre probability (CenterNet's focal-loss prior)
PRIOR = 0.05


def _conv(c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class MassDetector(nn.Module):
    """CenterNet-style detector: class heatmaps + box size + lesion mask.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for greyscale films).
    n_classes : int
        Object classes, one heatmap each (2: benign, malignant).
    width : int
        Channels of the stride-2 features (after the stem); deeper levels have 2× and 4×.
    downsample : int
        Average-pool factor of the stem: input px per feature px. The output stride is
        ``2 * downsample`` input px; input sides must be multiples of ``8 * downsample``.
    seed : int or None
        Seed of the initialisation (the global torch RNG is left untouched); ``None``
        draws from the global RNG.

    Notes
    -----
    Input ``(N, C, H, W)`` float32; output ``(N, n_classes + 3, H / s, W / s)`` with
    ``s = 2 * downsample`` (see the module docstring for the channels).
    `forward_features` takes the already pooled input (training on cached films).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        width: int = 16,
        downsample: int = 4,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        for key, value in (
            ("in_channels", in_channels),
            ("n_classes", n_classes),
            ("width", width),
            ("downsample", downsample),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.downsample = downsample
        w = width
        generator_state = None
        if seed is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
        try:
            self.stem = _conv(in_channels, w // 2)
            self.enc1 = nn.Sequential(_conv(w // 2, w, stride=2), _conv(w, w))
            self.enc2 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
            self.enc3 = nn.Sequential(
                _conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w, dilation=2)
            )
            self.lat3 = nn.Conv2d(4 * w, 2 * w, 1)
            self.lat2 = nn.Conv2d(2 * w, 2 * w, 1)
            self.smooth2 = _conv(2 * w, 2 * w)
            self.top2 = nn.Conv2d(2 * w, w, 1)
            self.lat1 = nn.Conv2d(w, w, 1)
            self.smooth1 = _conv(w, w)
            self.head = _conv(w, 2 * w)
            self.out = nn.Conv2d(2 * w, n_classes + 3, 1)
            bias = self.out.bias
            assert bias is not None
            with torch.no_grad():
                bias.zero_()
                bias[:n_classes] = -math.log((1 - PRIOR) / PRIOR)
                bias[n_classes] = -2.0
                bias[n_classes + 1 :] = math.log(4.0)
                self.out.weight.mul_(0.1)
        finally:
            if generator_state is not None:
                torch.random.set_rng_state(generator_state)

    @property
    def output_stride(self) -> int:
        """Input px per output px."""
        return 2 * self.downsample

    def raw_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Raw head output of a pooled input: logits and log sizes.

        Parameters
        ----------
        pooled : torch.Tensor
            ``(N, C, h, w)``, the input after the stem's average pool; ``h``, ``w``
            multiples of 8.

        Returns
        -------
        torch.Tensor
            ``(N, n_classes + 3, h / 2, w / 2)``: class logits, mask logit, log height,
            log width (output px, clamped to `LOG_SIZE_RANGE`).
        """
        x0 = self.stem(pooled)
        e1 = self.enc1(x0)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        p2 = self.lat2(e2) + functional.interpolate(self.lat3(e3), size=e2.shape[-2:])
        p2 = self.smooth2(p2)
        p1 = self.lat1(e1) + functional.interpolate(self.top2(p2), size=e1.shape[-2:])
        p1 = self.smooth1(p1)
        y = self.out(self.head(p1))
        k = self.n_classes + 1
        return torch.cat([y[:, :k], y[:, k:].clamp(*LOG_SIZE_RANGE)], dim=1)

    def forward_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """`forward` of an already pooled input (sizes as output px, not logs)."""
        y = self.raw_features(pooled)
        k = self.n_classes + 1
        return torch.cat([y[:, :k], torch.exp(y[:, k:])], dim=1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's fixed average pool, ``(N, C, H, W) -> (N, C, H / d, W / d)``."""
        side = 8 * self.downsample
        if x.ndim != 4 or x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(
                f"MassDetector expects (N, C, H, W) with H and W multiples of {side}, "
                f"got {tuple(x.shape)}"
            )
        if self.downsample == 1:
            return x
        return functional.avg_pool2d(x, self.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Heatmap and mask logits plus box sizes; see the class docstring for shapes."""
        return self.forward_features(self.pool(x))
