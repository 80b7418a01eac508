"""Memory format and size of the fallbacks' outputs: a channels_last input gives a channels_last output, as
``F.conv2d`` (and so ``nn.Conv2d``) does, also where the output is assembled from the active channels."""

from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-d tensor laid out as channels_last (and not also contiguous, as 1x1 or 1-channel maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def zeros_like_format(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """A zero tensor of ``shape`` with ``like``'s dtype and device, channels_last when ``like`` is (4-d only)."""
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt).zero_()


def out_hw(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int]) -> tuple[int, int]:
    """(H', W') of ``F.conv2d(x, weight, ...)``: the convolution's output size."""
    kh, kw = weight.shape[-2:]
    return ((x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
            (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1)
