"""Helpers shared by the tritonslide layers: converting from nn.Conv2d and checking inputs."""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair


def layer_seed(seed: int, name: str) -> int:
    """Per-layer seed: the config's seed mixed with the layer's qualified name (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def conv_unconvertible_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot become a tritonslide layer, or None when it can."""
    if isinstance(conv, nn.ConvTranspose2d):
        return "transposed convolution"
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str) and conv.padding == "same":
        if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
            return "padding='same' with an even kernel extent (asymmetric padding)"
    return None


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """nn.Conv2d padding as an int pair (resolving 'valid' and symmetric 'same')."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(_pair(conv.padding))


def conv_out_hw(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    return (
        (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
        (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1,
    )


def check_conv_input(layer: nn.Module, x: torch.Tensor, channels: int | None = None) -> None:
    """Raise a ValueError / TypeError naming ``layer`` when ``x`` does not fit it (batched NCHW input).

    ``channels``: the channel count expected when it is not ``layer.in_channels`` (a compact input)."""
    who = layer.display_name()
    c, kernel = layer.in_channels if channels is None else channels, layer.kernel_size
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who}: expected input of shape (N, {c}, H, W) or ({c}, H, W), got {tuple(x.shape)}")
    if x.shape[1] != c:
        raise ValueError(f"{who}: expected {c} input channels, i.e. shape (N, {c}, H, W), got {tuple(x.shape)}")
    ref = layer.weight
    if x.dtype != ref.dtype:
        raise TypeError(f"{who}: expected a {ref.dtype} input (the layer's dtype), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{who}: input is on {x.device} but the layer is on {ref.device}")
    for axis, size in (("height", x.shape[2]), ("width", x.shape[3])):
        i = 0 if axis == "height" else 1
        extent = layer.dilation[i] * (kernel[i] - 1) + 1
        if size + 2 * layer.padding[i] < extent:
            raise ValueError(
                f"{who}: input {axis} {size} (+{2 * layer.padding[i]} padding) is smaller than the kernel "
                f"extent {extent}"
            )


def dense_conv_like(layer: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Conv2d:
    """A plain nn.Conv2d with ``layer``'s geometry that reuses the given Parameters (no copy, no re-init)."""
    conv = nn.utils.skip_init(
        nn.Conv2d,
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    conv.weight = weight
    if bias is not None:
        conv.bias = bias
    return conv


class ConfigState:
    """Mixin of every tritonslide layer: the config (``self.config``) is saved as the module's extra state, and a
    state_dict saved with another config is refused with an error naming the layer (never a silent mis-load)."""

    STATE_FORMAT = 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "config": self.config.to_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("config") if isinstance(state, dict) else None
        if saved != self.config.to_dict():
            raise ValueError(
                f"{self.display_name()}: the state_dict was saved with config {saved} but this layer has "
                f"{self.config.to_dict()}; patch the model with the same config before loading"
            )
