"""Memory format of the fallbacks' outputs: a channels_last input gives a channels_last output, as ``F.conv2d``
(and so ``nn.Conv2d``) does, also where the output is assembled from the active channels."""

from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-d tensor laid out as channels_last (and not also contiguous, as 1x1 or 1-channel maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def zeros_like_format(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """A zero tensor of ``shape`` with ``like``'s dtype and device, channels_last when ``like`` is (4-d only)."""
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt).zero_()
