"""The MRI slice U-Net of paper 003: a `UNet` that optionally works on 2×-downsampled slices.

Paper 003 (breast-MRI tumour segmentation with a 2D U-Net over the slices of a volume)
downsampled its 512 × 512 slices to 256 × 256 to train four times faster. `SliceUNet`
keeps that option *inside* the network, so the engine, the run folder and every layer
still see full-resolution slices: the input is average-pooled by ``downsample``, the
`UNet` runs at the coarse resolution, and its logits are bilinearly upsampled back.
With ``downsample=1`` it is a plain `UNet`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ModelInputError
from .unet import UNet

__all__ = ["SliceUNet"]


class SliceUNet(nn.Module):
    """`UNet` on slices average-pooled by ``downsample``, logits upsampled back.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for one MRI sequence, e.g. FLAIR).
    out_channels : int
        Output logit channels.
    base, depth : int
        Width of the first stage and number of poolings of the inner `UNet`.
    downsample : int
        Integer factor of the average pooling applied to the input (1 = none, 2 = the
        paper's 2× downsampling).

    Attributes
    ----------
    size_multiple : int
        ``downsample · 2**depth``: input sides must be multiples of this, pixels.
    unet : UNet
        The inner network (state-dict keys ``unet.*``).

    Notes
    -----
    Input ``(N, in_channels, H, W)`` float32 → output ``(N, out_channels, H, W)`` logits
    (bilinear upsampling, ``align_corners=False``, so coarse pixel centres land on the
    centres of the ``downsample × downsample`` blocks they summarise). Parameter count
    with ``in_channels=1, base=16, depth=3``: 482,449 (1.9 MB float32) whatever
    ``downsample``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base: int = 16,
        depth: int = 3,
        downsample: int = 2,
    ) -> None:
        super().__init__()
        if int(downsample) != downsample or downsample < 1:
            raise ValueError(f"SliceUNet downsample must be an integer ≥ 1, got {downsample}")
        self.downsample = int(downsample)
        self.unet = UNet(in_channels, out_channels, base, depth)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_multiple = self.downsample * self.unet.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits at the input's resolution.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, in_channels, H, W)`` float32, ``H`` and ``W`` multiples of
            `size_multiple`.

        Returns
        -------
        torch.Tensor
            ``(N, out_channels, H, W)`` logits.
        """
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_input(x)
        f = self.downsample
        if f == 1:
            return self.unet(x)
        logits = self.unet(F.avg_pool2d(x, f))
        return F.interpolate(logits, scale_factor=f, mode="bilinear", align_corners=False)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ModelInputError(
                f"SliceUNet expects a (N, {self.in_channels}, H, W) tensor, "
                f"got shape {tuple(x.shape)}"
            )
        height, width = int(x.shape[2]), int(x.shape[3])
        m = self.size_multiple
        if height % m or width % m:
            raise ModelInputError(
                f"SliceUNet input {height} × {width} px: height and width must be multiples "
                f"of {m} (downsample · 2**depth); pad the slice, e.g. to "
                f"{-(-height // m) * m} × {-(-width // m) * m}"
            )
