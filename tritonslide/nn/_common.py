"""Helpers shared by the tritonslide layers: converting from nn.Conv2d and checking inputs."""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair


def layer_seed(seed: int, name: str) -> int:
    """Per-layer seed: the config's seed mixed with the layer's qualified name (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


# Largest singular value over the Marchenko-Pastur edge of an i.i.d. matrix of the same entry scale, below which a
# weight counts as untrained. Measured (20 draws per shape, 1x1 to 7x7 kernels, 1 to 512 channels): PyTorch's
# default init and kaiming_normal give 0.81-1.03; the 3-layer digits CNN's conv2/conv3 after one epoch of Adam 1.22
# / 1.12, after 12 epochs 1.88 / 1.49 (SGD with momentum: 1.54 / 1.42). Learning adds low-rank structure, which
# shows as singular values above the edge.
UNTRAINED_EDGE_RATIO = 1.1
_TEST_ROWS, _TEST_COLS = 512, 2048


@torch.no_grad()
def looks_untrained(weight: torch.Tensor) -> bool:
    """True when ``weight`` (O, ...) is statistically indistinguishable from an i.i.d. random initialization.

    For an (O, F) matrix of i.i.d. zero-mean entries of variance ``s^2`` the largest singular value is close to the
    edge ``s (sqrt(O) + sqrt(F))`` (Bai-Yin); ``s`` is estimated from the weight itself, so the test holds for any
    init scale. A weight counts as untrained when its largest singular value is below
    :data:`UNTRAINED_EDGE_RATIO` times that edge. A zero weight is not (a fit reproduces it exactly).
    """
    w = weight.detach().flatten(1)
    # A submatrix of an i.i.d. matrix is i.i.d., and the structure training adds (a few large directions) shows in
    # it too: evenly spaced rows and columns keep the test at ~0.2 s for any layer (an exact largest singular value
    # of VGG's 4096 x 25088 classifier weight took 143 s).
    for dim, cap in ((0, _TEST_ROWS), (1, _TEST_COLS)):
        if w.shape[dim] > cap:
            w = w.index_select(dim, torch.linspace(0, w.shape[dim] - 1, cap, device=w.device).long())
    w = w.to(device="cpu", dtype=torch.float64)
    o, f = w.shape
    norm = float(w.norm())
    if norm == 0.0 or o * f < 2:
        return False
    edge = norm / math.sqrt(o * f) * (math.sqrt(o) + math.sqrt(f))
    return float(torch.linalg.matrix_norm(w, ord=2)) < UNTRAINED_EDGE_RATIO * edge


def resolve_init(init: str, weights: list[torch.Tensor]) -> str:
    """The ``init`` a config asks for, with ``"auto"`` resolved for the dense ``weights`` about to be converted
    together (``patch``'s targets): ``"scratch"`` when every one :func:`looks_untrained` (a model about to be
    trained from scratch: nothing to fit, keep the dense layers' output scale), ``"fit"`` otherwise (a trained
    model: least squares, error at most the weight's norm). With no weights (``from_dense`` on its own, which is
    asked to convert that layer) ``"auto"`` is ``"fit"``."""
    if init != "auto":
        return init
    return "scratch" if weights and all(looks_untrained(w) for w in weights) else "fit"


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


def check_conv_input(
    layer: nn.Module, x: torch.Tensor, channels: int | None = None, ref: torch.Tensor | None = None
) -> None:
    """Raise a ValueError / TypeError naming ``layer`` when ``x`` does not fit it (batched NCHW input).

    ``channels``: the channel count expected when it is not ``layer.in_channels`` (a compact input). ``ref``: a
    Parameter that carries the layer's dtype and device (default ``layer.weight``). The layer's name is read only
    on the error path, so ``torch.compile`` never guards on it. Under autocast on x's device any floating input is
    accepted, as ``nn.Conv2d`` accepts it there (the ops cast to the autocast dtype)."""
    c, kernel = layer.in_channels if channels is None else channels, layer.kernel_size
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer.display_name()}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{layer.display_name()}: expected input of shape (N, {c}, H, W) or ({c}, H, W), "
                         f"got {tuple(x.shape)}")
    if x.shape[1] != c:
        raise ValueError(f"{layer.display_name()}: expected {c} input channels, i.e. shape (N, {c}, H, W), "
                         f"got {tuple(x.shape)}")
    ref = layer.weight if ref is None else ref
    if x.device != ref.device:
        raise ValueError(f"{layer.display_name()}: input is on {x.device} but the layer is on {ref.device}")
    if x.dtype != ref.dtype and not (x.is_floating_point() and autocast_on(x.device.type)):
        raise TypeError(f"{layer.display_name()}: expected a {ref.dtype} input (the layer's dtype), got {x.dtype}")
    for i, axis in ((0, "height"), (1, "width")):
        extent = layer.dilation[i] * (kernel[i] - 1) + 1
        if x.shape[2 + i] + 2 * layer.padding[i] < extent:
            raise ValueError(
                f"{layer.display_name()}: input {axis} {x.shape[2 + i]} (+{2 * layer.padding[i]} padding) is smaller "
                f"than the kernel extent {extent}"
            )


def autocast_on(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


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


# config fields that say how a layer was set up or how it runs, not what its state means: a state_dict saved under
# any value loads under any other
_NOT_STATE = frozenset({"init", "sync_active_set", "selection"})


def _without_init(config: Any, keys: frozenset[str] = frozenset({"init"})) -> Any:
    if not isinstance(config, dict):
        return config
    return {k: _without_init(v, keys) for k, v in config.items() if k not in keys}


def same_config(a: Any, b: Any) -> bool:
    """Whether two configs describe the same layers: equal but for ``init``, which says only how a layer was first
    set (``"auto"`` is recorded as what it resolved to)."""
    return type(a) is type(b) and _without_init(a.to_dict()) == _without_init(b.to_dict())


class ConfigState:
    """Mixin of every tritonslide layer: the config (``self.config``) is saved as the module's extra state, and a
    state_dict saved with another config is refused with an error naming the layer (never a silent mis-load)."""

    STATE_FORMAT = 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "config": self.config.to_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("config") if isinstance(state, dict) else None
        # ``init`` says only how the layer was first set, not what it computes: any init loads any other's state
        if _without_init(saved, _NOT_STATE) != _without_init(self.config.to_dict(), _NOT_STATE):
            raise ValueError(
                f"{self.display_name()}: the state_dict was saved with config {saved} but this layer has "
                f"{self.config.to_dict()}; patch the model with the same config before loading"
            )
