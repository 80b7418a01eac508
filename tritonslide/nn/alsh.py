"""ALSH convolution: per batch, hyperplane ALSH picks the filters likely to give large outputs.

Feeney (2019), shared/papers/001:
- pre-pass (Alg. 3): every flattened filter ``w`` is scaled so ``||w|| <= U < 1`` and transformed by
  ``P(w) = [w, 1/2 - ||w||^2, ..., 1/2 - ||w||^(2^m)]`` (eq. 3.5); its K-bit hyperplane code in each of the L
  tables is kept as the (O, L) buffer ``filter_codes`` (the tables as a tensor, not dicts).
- forward (Alg. 4): every im2col patch ``q`` of the batch is hashed with ``Q(q) = [q, 0, ..., 0]``, which makes
  its projections one convolution with the first C*kh*kw components of the planes (``tritonslide.ops.
  hash_histogram``); the ``top_buckets`` most frequent codes of each table are taken (4.2, 5.1.1), and the union
  of the filters whose codes fall in them is the active set, computed by ``tritonslide.ops.active_conv2d``.
- backward (Alg. 5): gradients reach the active filters only; ``dI`` flows through them only.
- last-active-set sharing (Alg. 6): when ``tritonslide.patch`` linked this layer to the ALSH layer before it
  (only zero-preserving modules in between), only that layer's active channels of the input are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from tritonslide import ops
from tritonslide._registry import MethodSpec, register_method
from tritonslide.configs import ALSHConfig
from tritonslide.nn._common import (
    ConfigState,
    check_conv_input,
    conv_out_hw,
    conv_unconvertible_reason,
    dense_conv_like,
    explicit_padding,
    layer_seed,
)


@dataclass(frozen=True)
class ALSHLayerStats:
    """Running statistics of one ALSH layer since the last reset (``tritonslide.stats``)."""

    calls: int
    active_fraction: float  # mean over calls of |active set| / out_channels; NaN before the first call
    bucket_max: float  # max over buckets of the mean bucket size (queries per code), Table 5.5
    bucket_std: float  # std of the mean bucket sizes within a table, averaged over tables, Table 5.5
    mean_bucket_sizes: torch.Tensor  # (L, 2**K) mean number of query patches per code and call


class ALSHSelector(ConfigState, nn.Module):
    """The ALSH machinery of every layer that picks its active filters by hashing (ALSHConv2d, MILFConv2d).

    Subclasses call :meth:`_init_alsh` in ``__init__``, provide :meth:`filter_matrix` (the (O, C*kh*kw) filters
    the tables index) and call :meth:`active_filters` in ``forward``. Buffers (moved by ``.to()``, saved in
    ``state_dict``): ``planes`` (L*K, C, kh, kw), the query part of the random hyperplanes; ``planes_extra``
    (L*K, m), their components on the m coordinates P appends; ``filter_codes`` (O, L) int64, each filter's
    bucket per table; ``steps``, the training forwards seen (drives ``rebuild_every``). The config (``self.config``)
    travels as the module's extra state and is checked when a state_dict loads.

    The active set is chosen per batch from the histogram of the whole batch's patches (as in the thesis), in
    eval mode too: a sample's output depends on the other samples of its batch and on the batch size. Tables
    follow the weights only when rebuilt (``rebuild_every``, ``tritonslide.rebuild_tables``): with
    ``rebuild_every=n`` the re-hash happens at the start of every n-th training forward, before hashing.
    """

    config: Any
    # whether forward takes the compact input of Alg. 6 (only the previous layer's active channels)
    accepts_compact_input: bool = False

    def _init_alsh(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int],
        dilation: int | tuple[int, int],
        alsh_config: ALSHConfig,
        seed: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = tuple(_pair(kernel_size)), tuple(_pair(stride))
        self.padding, self.dilation = tuple(_pair(padding)), tuple(_pair(dilation))
        self.alsh_config = alsh_config
        self._name = ""
        n_planes, d = alsh_config.tables * alsh_config.bits, in_channels * self.kernel_size[0] * self.kernel_size[1]
        gen = torch.Generator().manual_seed(seed)
        planes = torch.randn(n_planes, d + alsh_config.m, generator=gen, dtype=torch.float32)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("planes", planes[:, :d].reshape(n_planes, in_channels, *self.kernel_size).to(**factory))
        self.register_buffer("planes_extra", planes[:, d:].to(device=device))
        self.register_buffer(
            "filter_codes", torch.zeros(out_channels, alsh_config.tables, dtype=torch.int64, device=device)
        )
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        self._host_steps: int | None = 0  # mirror of `steps`: reading a CUDA buffer every step would sync
        # statistics: not needed to reproduce an output, so not saved
        self.register_buffer("stat_calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("stat_active", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.register_buffer(
            "stat_hist", torch.zeros(alsh_config.tables, 1 << alsh_config.bits, dtype=torch.float64, device=device),
            persistent=False,
        )
        # last-active-set sharing, set up by tritonslide.patch (plain attributes: not submodules, not state)
        object.__setattr__(self, "_share_source", None)
        self._publish = False
        self._published_active: torch.Tensor | None = None
        # Alg. 6 compact hand-off: _compact_ok when the linked consumer accepts it, _emit_compact while the linked
        # nn.Sequential runs (armed by its pre-hook, disarmed by its always-called post-hook).
        self._compact_ok = False
        self._emit_compact = False
        # (active output channels, read input channels) of the last forward, for tritonslide.summary
        self.last_active_counts: tuple[int, int] | None = None

    def filter_matrix(self) -> torch.Tensor:
        """(O, C*kh*kw) flattened filters that the tables index."""
        raise NotImplementedError(f"{type(self).__name__} must define filter_matrix()")

    def display_name(self) -> str:
        cls = type(self).__name__
        return f"{cls} '{self._name}'" if self._name else f"{cls}({self.in_channels}->{self.out_channels})"

    # ------------------------------------------------------------------ tables
    @torch.no_grad()
    def filter_projections(self) -> torch.Tensor:
        """(O, L*K) projections of ``P(w)`` of every flattened, U-scaled filter on the hyperplanes."""
        cfg = self.alsh_config
        w = self.filter_matrix().detach().float()
        w = w * (cfg.norm_bound / w.norm(dim=1).max().clamp_min(torch.finfo(torch.float32).tiny))
        proj = w @ self.planes.float().flatten(1).T
        if cfg.m:
            sq = (w * w).sum(1)
            # P appends 1/2 - ||w||^(2^i), i = 1..m: ||w||^2, ||w||^4, ... are repeated squarings of ||w||^2.
            tail = [0.5 - sq ** (1 << i) for i in range(cfg.m)]
            proj = proj + torch.stack(tail, 1) @ self.planes_extra.float().T
        return proj

    @torch.no_grad()
    def rebuild_tables(self) -> None:
        """Re-hash every filter into the L tables (the pre-pass, Alg. 3). Call after weights change."""
        bits = self.alsh_config.bits
        signs = (self.filter_projections() >= 0).view(self.out_channels, self.alsh_config.tables, bits)
        weights = 1 << torch.arange(bits, device=signs.device, dtype=torch.int64)
        self.filter_codes.copy_((signs.to(torch.int64) * weights).sum(-1))

    @torch.no_grad()
    def select_active(self, hist: torch.Tensor) -> torch.Tensor:
        """Sorted int64 indices of the active filters for a (L, 2**K) query histogram.

        Per table the ``top_buckets`` most frequent codes are taken (ties go to the lower code, so the choice is
        deterministic); a filter is active when its code in any table is among them. When fewer than
        ``min_active`` filters are active, the filters whose buckets collected the most query votes over all
        tables are added (ties to the lower filter index).
        """
        idx, count = self.select_active_padded(hist)
        return idx[: int(count)]  # the size reaches the host here (one synchronization on CUDA)

    @torch.no_grad()
    def select_active_padded(self, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select_active` without a host synchronization: an (O,) index buffer whose first ``count``
        entries are the active filters, and the 0-d device tensor ``count`` (:func:`tritonslide.ops.alsh_active_set`).
        """
        cfg = self.alsh_config
        return ops.alsh_active_set(hist, self.filter_codes, cfg.top_buckets, cfg.min_active)

    # ------------------------------------------------------------------ one ALSH step
    def _shared_in_idx(self) -> torch.Tensor | None:
        source = self._share_source
        if source is None or not self.alsh_config.share_active_set:
            return None
        idx, source._published_active = source._published_active, None  # consumed: never reused stale
        if idx is None or idx.numel() == self.in_channels:
            return None
        return idx

    def active_filters(
        self, x: torch.Tensor, in_idx: torch.Tensor | None, compact_input: bool = False, padded: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One ALSH step on a non-empty batch: rebuild the tables when due (training), hash every patch of ``x``
        (reading only ``in_idx``; with ``compact_input`` x holds just those channels), select the active set,
        record statistics and publish the set to a linked consumer. Returns the sorted active filter indices, or
        with ``padded`` the device-side ``(idx, count)`` of :meth:`select_active_padded` (no host sync)."""
        cfg = self.alsh_config
        if self.training:
            if self._host_steps is None:  # after load_state_dict: read the loaded buffer once
                self._host_steps = int(self.steps)
            if cfg.rebuild_every is not None and self._host_steps > 0 and self._host_steps % cfg.rebuild_every == 0:
                self.rebuild_tables()
            self.steps += 1
            self._host_steps += 1
        with torch.no_grad():
            if compact_input:
                planes = self.planes.index_select(1, in_idx)
                hist = ops.hash_histogram(x.detach(), planes, cfg.bits, self.stride, self.padding, self.dilation)
            else:
                hist = ops.hash_histogram(
                    x.detach(), self.planes, cfg.bits, self.stride, self.padding, self.dilation, in_idx=in_idx
                )
            idx, count = self.select_active_padded(hist)
            self.stat_calls += 1
            self.stat_active += count / self.out_channels
            self.stat_hist += hist
        if padded:
            if self._publish:
                raise RuntimeError(f"{self.display_name()}: a linked consumer needs the exact active set")
            return idx, count
        out_idx = idx[: int(count)]  # the size reaches the host here (one synchronization on CUDA)
        if self._publish:
            self._published_active = out_idx
        return out_idx

    # ------------------------------------------------------------------ stats and state
    def stats(self) -> ALSHLayerStats:
        calls = int(self.stat_calls)
        mean_hist = self.stat_hist / max(calls, 1)
        return ALSHLayerStats(
            calls=calls,
            active_fraction=float(self.stat_active) / calls if calls else float("nan"),
            bucket_max=float(mean_hist.max()),
            bucket_std=float(mean_hist.std(dim=1, unbiased=False).mean()),
            mean_bucket_sizes=mean_hist.cpu(),
        )

    def reset_stats(self) -> None:
        self.stat_calls.zero_()
        self.stat_active.zero_()
        self.stat_hist.zero_()

    def output_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (n, self.out_channels, *conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = None


    def extra_repr(self) -> str:
        c = self.alsh_config
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, L={c.tables}, K={c.bits}, "
            f"top_buckets={c.top_buckets}, m={c.m}" + (", shares_input" if self._share_source is not None else "")
        )


class ALSHConv2d(ALSHSelector):
    """Drop-in for ``nn.Conv2d`` (groups=1, zero padding) that computes only the filters ALSH selects.

    See :class:`ALSHSelector` for the buffers, the per-batch selection and the table rebuilds.
    """

    replaces = nn.Conv2d
    accepts_compact_input = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        config: ALSHConfig | None = None,
        *,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init_weights: bool = True,
    ) -> None:
        super().__init__()
        config = ALSHConfig() if config is None else config
        if not isinstance(config, ALSHConfig):
            raise TypeError(f"ALSHConv2d: expected an ALSHConfig, got {type(config).__name__}")
        self.config = config
        self._init_alsh(in_channels, out_channels, kernel_size, stride, padding, dilation, config,
                        config.seed if seed is None else seed, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if _init_weights:  # the same initialization as nn.Conv2d
            nn.Conv2d.reset_parameters(self)
        self.rebuild_tables()

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, config: ALSHConfig | None = None, *, name: str = "", context: Any = None
    ) -> "ALSHConv2d":
        """Wrap a trained ``nn.Conv2d``: its weight and bias Parameters are reused (an optimizer holding them
        keeps working) and the filters are hashed into fresh tables. ``name`` (the qualified name ``patch``
        passes) is mixed into the seed so that layers get independent hyperplanes."""
        config = ALSHConfig() if config is None else config
        reason = conv_unconvertible_reason(conv)
        if reason is not None:
            raise ValueError(f"ALSHConv2d.from_dense({name or type(conv).__name__}): cannot convert: {reason}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv),
            conv.dilation, conv.bias is not None, config, seed=layer_seed(config.seed, name),
            device=conv.weight.device, dtype=conv.weight.dtype, _init_weights=False,
        )
        layer.weight = conv.weight
        if conv.bias is not None:
            layer.bias = conv.bias
        layer._name = name
        layer.rebuild_tables()
        return layer

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (all filters, same Parameters)."""
        return dense_conv_like(self, self.weight, self.bias)

    def filter_matrix(self) -> torch.Tensor:
        return self.weight.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        in_idx = self._shared_in_idx()
        # Inside a linked nn.Sequential the previous layer hands over only its active channels (Alg. 6).
        compact_in = in_idx is not None and isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == len(in_idx)
        check_conv_input(self, x, channels=len(in_idx) if compact_in else None)
        if x.shape[0] == 0:
            y = ops.active_conv2d(x, self.weight, self.bias, None, None, self.stride, self.padding, self.dilation)
        else:
            compact_out = self._publish and self._emit_compact and self._compact_ok
            if self._publish:  # a linked consumer reads the set: its size must reach the host
                out_idx, count = self.active_filters(x, in_idx, compact_in), None
            else:  # nothing downstream needs the size: the set stays on the device with its count (no sync)
                out_idx, count = self.active_filters(x, in_idx, compact_in, padded=True)
            self.last_active_counts = (out_idx.numel() if count is None else count,
                                       self.in_channels if in_idx is None else in_idx.numel())
            y = ops.active_conv2d(
                x, self.weight, self.bias, out_idx, in_idx, self.stride, self.padding, self.dilation,
                compact_input=compact_in, compact_output=compact_out, out_count=count,
            )
        return y.squeeze(0) if unbatched else y

    def param_count(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def dense_macs(self, out_h: int, out_w: int) -> int:
        return self.weight.numel() * out_h * out_w

    def macs(self, out_h: int, out_w: int) -> int:
        """Multiply-adds per sample at the last forward's active set: hashing (L*K projections of the read
        channels) plus the active filters on the read channels."""
        o, c = self.last_active_counts or (self.out_channels, self.in_channels)
        o = int(o)  # a device-side count of the sync-free path is read here, outside forward
        taps = self.kernel_size[0] * self.kernel_size[1]
        return (self.alsh_config.tables * self.alsh_config.bits + o) * c * taps * out_h * out_w

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias={self.bias is not None}"


register_method(
    MethodSpec(
        name="alsh",
        config_cls=ALSHConfig,
        converters=((nn.Conv2d, ALSHConv2d), (nn.ConvTranspose2d, ALSHConv2d)),
        unconvertible_reason=lambda module, config: conv_unconvertible_reason(module),
    )
)
