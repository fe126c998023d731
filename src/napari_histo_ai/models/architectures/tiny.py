"""Tiny networks for tests, demos and the tiling oracle (a few thousand parameters).

They follow the tensor contract of `napari_histo_ai.models.spec`: input float32
``(N, C, H, W)``; dense nets return ``(N, K, H / s, W / s)``, the classifier ``(N, K)``.
Each takes a ``seed`` (default 0) so that a ``format: builtin`` entry without weights
gives the same numbers on every load; the global torch RNG is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional

__all__ = ["TinyClassifier", "TinyDetector", "TinyFCN"]


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Context in which CPU initialisation draws from ``seed``; the global RNG is restored.

    ``None``: no-op (the global RNG is used and advanced).
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


class TinyFCN(nn.Module):
    """Translation-equivariant fully convolutional net.

    ``depth`` × (3×3 convolution with zero 'same' padding + ReLU), then a 1×1
    convolution to ``out_channels``; with ``stride > 1`` an average pool of that stride
    ends the net.

    Parameters
    ----------
    in_channels : int
        Input channels C.
    out_channels : int
        Output channels K.
    width : int
        Channels of the hidden layers.
    depth : int
        Number of 3×3 layers (0 allowed: a 1×1 net). It is the **receptive-field radius**
        in input pixels: an output pixel depends on inputs at most ``depth`` pixels away
        (plus its own ``stride`` block when ``stride > 1``).
    stride : int
        Output stride s: output is ``(N, K, H // s, W // s)``.
    bias : bool
        Convolutions have biases. Without them a zero input gives zero activations, so
        padding the image with zeros is the same as each layer's zero padding.
    seed : int or None
        Seed of the weight initialisation; ``None`` uses the global torch RNG.

    Notes
    -----
    Tiled inference equals whole-image inference exactly when every tile keeps only
    outputs at least ``depth`` input pixels from its edges (``io.halo >= depth``) and,
    with ``stride > 1``, tile origins are multiples of ``stride``. At the image border
    it also holds when tiles end at the image edge, or, for ``bias=False``, when the
    image is padded with zeros.

    Examples
    --------
    >>> import torch
    >>> TinyFCN(out_channels=2, stride=2)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 2, 16, 16])
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        width: int = 8,
        depth: int = 2,
        stride: int = 1,
        bias: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        _check_positive(
            in_channels=in_channels, out_channels=out_channels, width=width, stride=stride
        )
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
        self.depth = depth
        self.stride = stride
        with _seeded(seed):
            layers: list[nn.Module] = []
            channels = in_channels
            for _ in range(depth):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=bias), nn.ReLU()]
                channels = width
            layers.append(nn.Conv2d(channels, out_channels, 1, bias=bias))
            if stride > 1:
                layers.append(nn.AvgPool2d(stride))
            self.body = nn.Sequential(*layers)

    @property
    def receptive_radius(self) -> int:
        """Input pixels each side an output pixel depends on (= ``depth``)."""
        return self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` to ``(N, K, H // stride, W // stride)`` logits."""
        out: torch.Tensor = self.body(x)
        return out


class TinyClassifier(nn.Module):
    """Patch classifier: conv → pool → conv → global average pool → linear.

    Parameters
    ----------
    in_channels : int
        Input channels C.
    n_classes : int
        Output channels K.
    width : int
        Channels of the first convolution (the second has ``2 * width``).
    seed : int or None
        Seed of the weight initialisation; ``None`` uses the global torch RNG.

    Examples
    --------
    >>> import torch
    >>> TinyClassifier(n_classes=4)(torch.zeros(2, 3, 17, 9)).shape
    torch.Size([2, 4])
    """

    def __init__(
        self, in_channels: int = 3, n_classes: int = 2, width: int = 8, seed: int | None = 0
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, n_classes=n_classes, width=width)
        with _seeded(seed):
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
                nn.Conv2d(width, 2 * width, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` (any H, W ≥ 1) to ``(N, n_classes)`` logits."""
        out: torch.Tensor = self.head(self.features(x))
        return out


class TinyDetector(nn.Module):
    """CenterNet-style dense detector at input resolution.

    Output channels: ``n_classes`` centre-heatmap logits, then box height and width in
    output pixels (made positive with softplus). Use with an output of kind ``boxes``
    and ``size_channels: [n_classes, n_classes + 1]``.

    Parameters
    ----------
    in_channels : int
        Input channels C.
    n_classes : int
        Heatmap channels.
    width : int
        Channels of the two hidden 3×3 layers (receptive-field radius 2 px).
    seed : int or None
        Seed of the weight initialisation; ``None`` uses the global torch RNG.

    Examples
    --------
    >>> import torch
    >>> TinyDetector(n_classes=2)(torch.zeros(1, 3, 16, 16)).shape
    torch.Size([1, 4, 16, 16])
    """

    def __init__(
        self, in_channels: int = 3, n_classes: int = 1, width: int = 8, seed: int | None = 0
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, n_classes=n_classes, width=width)
        self.n_classes = n_classes
        with _seeded(seed):
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
            )
            self.heatmap = nn.Conv2d(width, n_classes, 1)
            self.size = nn.Conv2d(width, 2, 1)
        # CenterNet prior: sigmoid(-2.19) = 0.1 so an untrained net finds few peaks
        with torch.no_grad():
            self.heatmap.bias.fill_(-2.19)  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` to ``(N, n_classes + 2, H, W)``."""
        features = self.features(x)
        size = functional.softplus(self.size(features))
        return torch.cat([self.heatmap(features), size], dim=1)
