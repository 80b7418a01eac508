"""Rank-N filter approximation: convolution kernels replaced by truncated-SVD factors run as separable convolutions.

Jaladi, shared/papers/002:
- sec. VI-VII: a rank-1 filter ``F = f g^T`` (kh x kw) turns the 2-D convolution into a vertical 1-D convolution
  with ``f`` followed by a horizontal one with ``g`` (``B_ij = f^T P_ij g``, ``B = f*^T A g*``).
- sec. VIII: a rank-n filter ``F = sum_i f_i g_i^T`` is the sum of n such separable convolutions,
  ``B = sum_i f_i*^T A g_i*``.
- sec. IX: the best rank-m approximation of ``F`` in the Frobenius norm is the truncated SVD
  ``F'_m = sum_{i<=m} s_i u_i v_i^T`` (Eckart-Young); its error is ``sqrt(sum_{i>m} s_i^2)``.

Two schemes (``LowRankConfig.scheme``):

``"filter"`` is the paper's method applied to every 2-D slice of a multi-channel kernel:
``W[o, c] ~= sum_{j<r} s_j u_j v_j^T`` per (o, c), stored as ``vertical[o, c, j] = sqrt(s_j) u_j`` (O, C, r, kh) and
``horizontal[o, c, j] = sqrt(s_j) v_j`` (O, C, r, kw) (the paper puts ``s_j`` into ``f``; the balanced split gives the
same product and better-scaled gradients when training the factors). Exact at ``r = min(kh, kw)``. In a
multi-channel layer every (o, c) pair has its own vertical filters, so the separable form must keep C*O*r
intermediate maps: it costs ``C*O*r*(kh*W_in + kw*W_out)*H_out`` multiply-adds against the dense
``C*O*kh*kw*H_out*W_out``, i.e. fewer only when ``r*(kh*s_w + kw) < kh*kw`` (r = 1 for 3x3 at stride 1, 6 vs 9),
and it stores C*r times the layer's output for the backward. The layer therefore runs the separable path only
when it saves multiply-adds and ``C*r <= 16``; otherwise it runs one dense convolution with the reconstructed
weight, which is the cheapest exact form (the dense cost, no intermediate; forming the weight costs O*C*r*kh*kw
multiply-adds once per forward, independent of the batch).

``"channel"`` shares r separable basis filters across channels: a vertical convolution C -> r with
``vertical`` (r, C, kh, 1), then a horizontal convolution r -> O with ``horizontal`` (O, r, 1, kw), plus the bias, so
``W[o, c, y, x] = sum_j vertical[j, c, y] horizontal[o, j, x]``. ``from_dense`` takes the truncated SVD of the
kernel reshaped to ``M[(c, y), (o, x)] = W[o, c, y, x]`` ((C*kh) x (O*kw)), split as ``sqrt(s)`` into both factors;
exact at ``r = min(C*kh, O*kw)``. Cost ``r*(C*kh*W_in + O*kw*W_out)*H_out``: for 256 -> 256 3x3 at r = 8 that is
about 1/24 of the dense conv.

Both schemes: the vertical convolution takes the vertical stride, padding and dilation and the horizontal one the
horizontal ones (zero padding and striding act on one axis each, so the composition equals the dense convolution
with the reconstructed weight exactly). ``rank`` is capped at each layer's full rank. All factors are Parameters,
so a layer built directly (not by ``from_dense``) trains from scratch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from tritonslide._registry import MethodSpec, register_method
from tritonslide.configs import LowRankConfig
from tritonslide.nn._common import (
    ConfigState,
    check_conv_input,
    conv_out_hw,
    conv_unconvertible_reason,
    dense_conv_like,
    explicit_padding,
    resolve_init,
)

# The separable 'filter' path keeps C*r intermediate maps per output map for the backward; 256 -> 256 at r = 1 on
# 32x32 inputs would hold 17 GB per 64-sample batch (float32) against 67 MB of output. 16x the output is the most
# it may keep; beyond that the dense conv with the reconstructed weight (no intermediate) runs instead.
_SEPARABLE_MAX_EXPANSION = 16


def filter_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-slice truncated SVD (sec. IX) of an (O, C, kh, kw) kernel, in float64.

    Returns ``vertical`` (O, C, r, kh), ``horizontal`` (O, C, r, kw) with ``W[o, c] ~= vertical[o, c].T @
    horizontal[o, c]`` (``sqrt(s_j)`` in each factor) and the singular values (O, C, min(kh, kw)).
    """
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # batched over (O, C): u (O,C,kh,k), vh (O,C,k,kw)
    root = s[..., :rank].sqrt()
    vertical = (u[..., :rank] * root.unsqueeze(-2)).transpose(-1, -2)
    horizontal = vh[..., :rank, :] * root.unsqueeze(-1)
    return vertical.contiguous(), horizontal.contiguous(), s


def channel_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of the kernel reshaped to ``M[(c, y), (o, x)] = W[o, c, y, x]``, in float64.

    Returns ``vertical`` (r, C, kh, 1), ``horizontal`` (O, r, 1, kw) with ``sqrt(s_j)`` in each factor and the
    singular values of M (min(C*kh, O*kw),).
    """
    o, c, kh, kw = weight.shape
    m = weight.detach().to(torch.float64).permute(1, 2, 0, 3).reshape(c * kh, o * kw)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).T.reshape(rank, c, kh, 1)
    horizontal = (vh[:rank] * root.unsqueeze(1)).reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous(), s


class LowRankConv2d(ConfigState, nn.Module):
    """Drop-in for ``nn.Conv2d`` (groups=1, zero padding) whose kernel is a rank-r factorization (see the module
    docstring for the two schemes, their equations and costs).

    Parameters: ``vertical`` and ``horizontal`` (the factors; shapes depend on the scheme) and ``bias``. Attributes:
    ``rank`` (the effective rank, ``config.rank`` capped at ``full_rank``), ``full_rank`` (``min(kh, kw)`` for
    "filter", ``min(C*kh, O*kw)`` for "channel"). The config travels as the module's extra state.
    """

    replaces = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        config: LowRankConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init_weights: bool = True,
    ) -> None:
        super().__init__()
        config = LowRankConfig() if config is None else config
        if not isinstance(config, LowRankConfig):
            raise TypeError(f"LowRankConv2d: expected a LowRankConfig, got {type(config).__name__}")
        self.config = config
        self._name = ""
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = tuple(_pair(kernel_size)), tuple(_pair(stride))
        self.padding, self.dilation = tuple(_pair(padding)), tuple(_pair(dilation))
        self.scheme = config.scheme
        c, o, (kh, kw) = self.in_channels, self.out_channels, self.kernel_size
        self.full_rank = min(kh, kw) if self.scheme == "filter" else min(c * kh, o * kw)
        self.rank = r = min(config.rank, self.full_rank)
        factory = {"device": device, "dtype": dtype}
        if self.scheme == "filter":
            self.vertical = nn.Parameter(torch.empty(o, c, r, kh, **factory))
            self.horizontal = nn.Parameter(torch.empty(o, c, r, kw, **factory))
        else:
            self.vertical = nn.Parameter(torch.empty(r, c, kh, 1, **factory))
            self.horizontal = nn.Parameter(torch.empty(o, r, 1, kw, **factory))
        self.bias = nn.Parameter(torch.empty(o, **factory)) if bias else None
        # 'filter' runs separably only where that saves multiply-adds (per output pixel: r*(kh*s_w + kw) against
        # kh*kw, the vertical pass running at s_w times the output width) and the intermediate stays bounded.
        self._filter_path = (
            "separable"
            if r * (kh * self.stride[1] + kw) < kh * kw and c * r <= _SEPARABLE_MAX_EXPANSION
            else "dense"
        )
        if _init_weights:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Training from scratch: i.i.d. ``U(-1, 1)`` factors rescaled (each by the same factor, so they stay
        balanced) so that the reconstructed kernel has ``nn.Conv2d``'s expected norm, ``E||W||^2 = numel / (3
        fan_in)`` (kaiming_uniform with a = sqrt(5)); the bias as in ``nn.Conv2d``. Draws use the global RNG, as nn
        layers do. (An SVD of a drawn dense kernel, as ``from_dense`` does, costs ~0.6 s per 512-channel layer.)"""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.vertical.uniform_(-1, 1)
        self.horizontal.uniform_(-1, 1)
        target = math.sqrt(self.out_channels / 3)  # sqrt(numel / (3 fan_in)), numel = O fan_in
        norm = float(self.reconstructed_weight().norm())
        if norm > 0:
            root = math.sqrt(target / norm)
            self.vertical.mul_(root)
            self.horizontal.mul_(root)
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _set_factors(self, weight: torch.Tensor) -> None:
        factors = filter_factors if self.scheme == "filter" else channel_factors
        vertical, horizontal, _ = factors(weight, self.rank)
        self.vertical.copy_(vertical)
        self.horizontal.copy_(horizontal)

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, config: LowRankConfig | None = None, *, name: str = "", context: Any = None
    ) -> "LowRankConv2d":
        """Factor a trained ``nn.Conv2d``: its kernel's truncated SVD (float64, then cast to the conv's dtype) gives
        the factors, new Parameters (``config.init="scratch"``: :meth:`reset_parameters` instead, for training from
        scratch); the bias Parameter is reused (an optimizer holding it keeps working). ``name`` only names the
        layer in messages."""
        config = LowRankConfig() if config is None else config
        reason = conv_unconvertible_reason(conv)
        if reason is not None:
            raise ValueError(f"LowRankConv2d.from_dense({name or type(conv).__name__}): cannot convert: {reason}")
        init = resolve_init(config.init, [])
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv),
            conv.dilation, conv.bias is not None, config, device=conv.weight.device, dtype=conv.weight.dtype,
            _init_weights=init == "scratch",
        )
        if init == "fit":
            layer._set_factors(conv.weight)
        else:  # "scratch": the dense layer's own init scale (torchvision's kaiming_normal, say), not nn's default
            with torch.no_grad():
                root = (conv.weight.detach().norm() / layer.reconstructed_weight().norm().clamp_min(1e-30)).sqrt()
                layer.vertical.mul_(root.to(layer.vertical))
                layer.horizontal.mul_(root.to(layer.horizontal))
        if conv.bias is not None:
            layer.bias = conv.bias
        layer._name = name
        return layer

    # ------------------------------------------------------------------ the kernel the factors represent
    def _reconstruct(self, vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
        if self.scheme == "filter":  # W[o, c] = sum_j vertical[o, c, j] (x) horizontal[o, c, j]
            return torch.einsum("ocjy,ocjx->ocyx", vertical, horizontal)
        # W[o, c, y, x] = sum_j vertical[j, c, y] horizontal[o, j, x]
        return torch.einsum("jcy,ojx->ocyx", vertical[..., 0], horizontal[:, :, 0])

    def reconstructed_weight(self) -> torch.Tensor:
        """The dense (O, C, kh, kw) kernel the factors represent (differentiable in the factors)."""
        return self._reconstruct(self.vertical, self.horizontal)

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed kernel, formed on every access, for code written for ``nn.Conv2d`` (``forward`` of the
        "channel" scheme never forms it)."""
        return self.reconstructed_weight()

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d``: the reconstructed kernel as a new Parameter, the same bias Parameter."""
        weight = nn.Parameter(self.reconstructed_weight().detach().clone())
        return dense_conv_like(self, weight, self.bias)

    # ------------------------------------------------------------------ forward
    def display_name(self) -> str:
        cls = type(self).__name__
        return f"{cls} '{self._name}'" if self._name else f"{cls}({self.in_channels}->{self.out_channels})"

    def _check_input(self, x: torch.Tensor) -> None:
        # the layer's dtype and device from a factor (``.weight`` would form the full weight)
        check_conv_input(self, x, ref=self.horizontal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        self._check_input(x)
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        if self.scheme == "channel":
            z = F.conv2d(x, self.vertical, None, (sh, 1), (ph, 0), (dh, 1))  # (N, r, H_out, W_in)
            y = F.conv2d(z, self.horizontal, self.bias, (1, sw), (0, pw), (1, dw))
        elif self._filter_path == "separable":
            o, c, r, kh = self.vertical.shape
            # grouped by input channel: the (c, o, j) map is column conv of x[c] with vertical[o, c, j]
            wv = self.vertical.transpose(0, 1).reshape(c * o * r, 1, kh, 1)
            z = F.conv2d(x, wv, None, (sh, 1), (ph, 0), (dh, 1), groups=c)
            n, _, hh, ww = z.shape
            # regroup by output channel, (c, o, j) -> (o, c, j), so that one group sums over (c, j) into o
            z = z.view(n, c, o, r, hh, ww).transpose(1, 2).reshape(n, o * c * r, hh, ww)
            wh = self.horizontal.reshape(o, c * r, 1, self.kernel_size[1])
            y = F.conv2d(z, wh, self.bias, (1, sw), (0, pw), (1, dw), groups=o)
        else:
            y = F.conv2d(x, self.reconstructed_weight(), self.bias, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    # ------------------------------------------------------------------ costs
    def param_count(self) -> int:
        """Trainable parameters: the factors plus the bias, ``r*(C*kh + O*kw) + O`` ("channel") or
        ``O*C*r*(kh + kw) + O`` ("filter")."""
        return sum(p.numel() for p in (self.vertical, self.horizontal, self.bias) if p is not None)

    def dense_macs(self, out_h: int, out_w: int) -> int:
        return self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1] * out_h * out_w

    def _vertical_width(self, out_w: int) -> int:
        # columns the vertical pass runs over: the input width, taken as the smallest one that gives out_w
        # (exact at stride 1; at most stride - 1 columns short otherwise)
        sw, pw, dw, kw = self.stride[1], self.padding[1], self.dilation[1], self.kernel_size[1]
        return max((out_w - 1) * sw + dw * (kw - 1) + 1 - 2 * pw, 1)

    def macs(self, out_h: int, out_w: int) -> int:
        """Multiply-adds per sample of the forward as implemented (bias adds not counted, as in ``dense_macs``).

        "channel": ``r*C*kh*H_out*W_in + O*r*kw*H_out*W_out``; "filter", separable path:
        ``C*O*r*kh*H_out*W_in + O*C*r*kw*H_out*W_out``; "filter", dense path: the dense conv, ``O*C*kh*kw*H_out*W_out``
        (plus O*C*r*kh*kw once per forward to form the kernel, not per sample, not counted).
        """
        c, o, r, (kh, kw) = self.in_channels, self.out_channels, self.rank, self.kernel_size
        w_in = self._vertical_width(out_w)
        if self.scheme == "channel":
            return r * c * kh * out_h * w_in + o * r * kw * out_h * out_w
        if self._filter_path == "separable":
            return c * o * r * (kh * out_h * w_in + kw * out_h * out_w)
        return self.dense_macs(out_h, out_w)

    def output_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (n, self.out_channels, *conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation))

    # ------------------------------------------------------------------ state

    def extra_repr(self) -> str:
        path = f" ({self._filter_path})" if self.scheme == "filter" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, scheme={self.scheme!r}{path}, "
            f"rank={self.rank}/{self.full_rank}, bias={self.bias is not None}"
        )


register_method(
    MethodSpec(
        name="lowrank",
        config_cls=LowRankConfig,
        # transposed convs are matched only so that patch's warning lists them (their reason says why)
        converters=((nn.Conv2d, LowRankConv2d), (nn.ConvTranspose2d, LowRankConv2d)),
        unconvertible_reason=lambda module, config: conv_unconvertible_reason(module),
    )
)
