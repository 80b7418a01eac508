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
import torch.distributed as dist
from torch import nn
from torch.nn.modules.utils import _pair

from tritonslide import _library, ops
from tritonslide._backend import resolve_backend
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

    Everything that changes per step lives in tensors (``steps``, the statistics, ``last_active``) and the rebuild
    schedule is a ``torch.where`` on ``steps``, so ``torch.compile`` traces one graph that no step invalidates.

    Who shares a set is ``config.selection`` (issue #15): per sample (each sample's histogram over its own patches
    picks its own filters; its output does not depend on its batch companions), per batch (the histogram of the
    whole batch's patches, as in the thesis), or ``"auto"``: per batch in training, per sample in eval. With
    ``sync_active_set`` a per-batch histogram is summed over the ranks of the default process group first, so every
    rank computes the filters one process would choose for the global batch. Tables
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
        # statistics: not needed to reproduce an output, so not saved
        self.register_buffer("stat_calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        # (1,), not 0-d: Dynamo turns a 0-d float buffer into a symbolic float, which made AOTAutograd restart the
        # whole trace (ResNet-18: 2x the compile time)
        self.register_buffer("stat_active", torch.zeros(1, dtype=torch.float64, device=device), persistent=False)
        self.register_buffer(
            "stat_hist", torch.zeros(alsh_config.tables, 1 << alsh_config.bits, dtype=torch.float64, device=device),
            persistent=False,
        )
        # (active output channels, read input channels) of the last forward, for tritonslide.summary; -1: none yet
        self.register_buffer("last_active", torch.full((2,), -1, dtype=torch.int64, device=device), persistent=False)
        # last-active-set sharing, set up by tritonslide.patch (plain attributes: not submodules, not state)
        object.__setattr__(self, "_share_source", None)
        self._publish = False
        # (exact active set, its 0-d count, whether the output was compact) of the running call, for the consumer
        self._published_active: tuple[torch.Tensor, torch.Tensor, bool] | None = None
        # Alg. 6 compact hand-off: _compact_ok when the linked consumer accepts it, _emit_compact while the linked
        # nn.Sequential runs (armed by its pre-hook, disarmed by its always-called post-hook).
        self._compact_ok = False
        self._emit_compact = False

    @property
    def last_active_counts(self) -> tuple[int, int] | None:
        """(active output channels, read input channels) of the last forward, or None before the first one."""
        o, c = (int(v) for v in self.last_active)
        return None if o < 0 else (o, c)

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
    def table_codes(self) -> torch.Tensor:
        """(O, L) int64 code of every filter in every table (the pre-pass, Alg. 3), from the current weights."""
        bits = self.alsh_config.bits
        signs = (self.filter_projections() >= 0).view(self.out_channels, self.alsh_config.tables, bits)
        weights = 1 << torch.arange(bits, device=signs.device, dtype=torch.int64)
        return (signs.to(torch.int64) * weights).sum(-1)

    @torch.no_grad()
    def rebuild_tables(self) -> None:
        """Re-hash every filter into the L tables (the pre-pass, Alg. 3). Call after weights change."""
        self.filter_codes.copy_(self.table_codes())

    @torch.no_grad()
    def select_active(self, hist: torch.Tensor) -> torch.Tensor:
        """Sorted int64 indices of the active filters for a (L, 2**K) query histogram.

        Per table the ``top_buckets`` most frequent codes are taken (ties go to the lower code, so the choice is
        deterministic; a code no patch hit is never taken); a filter is active when its code in any table is among
        them. When fewer than ``min_active`` filters are active, the filters whose buckets collected the most query
        votes over all tables are added (ties to the lower filter index).
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
    def _shared_input(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, bool]:
        """``(in_idx, in_count, read, compact)`` from the linked producer's running call: its active set (exact, or
        padded with the 0-d count ``in_count``), the number of channels read (0-d tensor) and whether ``x`` holds
        only those channels; ``(None, None, None, False)`` when not linked."""
        source = self._share_source
        if source is None or not self.alsh_config.share_active_set:
            return None, None, None, False
        published, source._published_active = source._published_active, None  # consumed: never reused stale
        if published is None:
            return None, None, None, False
        idx, count, padded, compact = published
        return idx, count if padded else None, count, compact

    def _publish_set(self, idx: torch.Tensor, count: torch.Tensor, padded: bool, compact: bool) -> None:
        self._published_active = (idx, count, padded, compact)

    def _count_step(self) -> None:
        """A training forward: rebuild the tables when ``rebuild_every`` says so (before hashing), count it.

        The schedule is evaluated on the ``steps`` buffer with ``torch.where``, never on a Python counter, which
        ``torch.compile`` would guard on and recompile for at every step. The codes are then formed at every training
        step: an (O, C kh kw) x (C kh kw, L K) product, L K / (N H' W') of the dense layer's multiply-adds (0.12% on
        VGG-11's 14x14 layers at batch 64 with L K = 15)."""
        every = self.alsh_config.rebuild_every
        if every is not None:
            with torch.no_grad():
                due = (self.steps > 0) & (self.steps % every == 0)
                self.filter_codes.copy_(torch.where(due, self.table_codes(), self.filter_codes))
        self.steps += 1

    def per_sample(self) -> bool:
        """Whether this forward chooses one active set per sample (``config.selection`` and the mode)."""
        return self.alsh_config.per_sample(self.training)

    def active_filters(
        self,
        x: torch.Tensor,
        in_idx: torch.Tensor | None,
        in_count: torch.Tensor | None = None,
        compact_input: bool = False,
        padded: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ALSH step on a non-empty batch: rebuild the tables when due (training), hash every patch of ``x``
        (reading only ``in_idx``, padded with ``in_count`` or exact; with ``compact_input`` x holds just those
        channels), select the active set and record statistics. Returns ``(idx, count)``: with ``padded`` the
        device-side (O,) buffer and 0-d count of :func:`tritonslide.ops.alsh_active_set` (no host sync), else the
        exact sorted set (:func:`tritonslide.ops.active_indices`) and its count. Per sample (:meth:`per_sample`):
        always the padded (N, O) rows and (N,) counts, each sample's histogram over its own patches."""
        cfg = self.alsh_config
        if self.training:
            self._count_step()
        if self.per_sample():
            with torch.no_grad():
                if compact_input and in_idx.dim() == 2:  # a per-sample producer's compact output (its rows)
                    hist = self._hash_compact_rows(x, in_idx, in_count)
                else:
                    if compact_input:  # a per-batch producer's compact output: the same set per sample
                        x, in_count = _expand_channels(x, in_idx, self.in_channels), None
                    hist = ops.hash_histogram(x, self.planes, cfg.bits, self.stride, self.padding, self.dilation,
                                              in_idx=in_idx, in_count=in_count, per_sample=True)
                idx, count = ops.alsh_active_set(hist, self.filter_codes, cfg.top_buckets, cfg.min_active)
                self.stat_calls += 1
                self.stat_active += count.to(torch.float64).mean() / self.out_channels
                self.stat_hist += hist.sum(0)
            return idx, count
        with torch.no_grad():
            if compact_input:
                planes = self.planes.index_select(1, in_idx)
                hist = ops.hash_histogram(x, planes, cfg.bits, self.stride, self.padding, self.dilation)
            else:
                hist = ops.hash_histogram(x, self.planes, cfg.bits, self.stride, self.padding, self.dilation,
                                          in_idx=in_idx, in_count=in_count)
            if cfg.sync_active_set and _distributed():
                dist.all_reduce(hist)  # every rank chooses from the global batch's histogram
            idx, count = self.select_active_padded(hist)
            self.stat_calls += 1
            self.stat_active += count / self.out_channels
            self.stat_hist += hist
        if padded:
            return idx, count
        return ops.active_indices(idx, count), count

    def _hash_compact_rows(self, x: torch.Tensor, in_idx: torch.Tensor, in_count: torch.Tensor | None) -> torch.Tensor:
        """(N, L, 2**K) histograms of a per-sample compact input (channel ``j`` of sample ``n`` is input channel
        ``in_idx[n, j]``): :func:`tritonslide.ops.hash_histogram` with ``compact_input``, which equals hashing the
        full-size input, zero outside each sample's channels. The CPU fallback runs it in chunks of samples, a
        stride-1 layer of at most 3x3 taps without ever building the full-size input
        (:func:`~tritonslide.cpu_fallback.hash_histogram.torch_hash_histogram_rows`)."""
        cfg = self.alsh_config
        return ops.hash_histogram(x, self.planes, cfg.bits, self.stride, self.padding, self.dilation, in_idx=in_idx,
                                  in_count=in_count, per_sample=True, compact_input=True)

    def sync_empty_batch(self) -> None:
        """With ``sync_active_set``, a rank whose batch is empty still joins the histogram all-reduce (with zeros):
        the other ranks' collectives would otherwise wait for it, or pair with another layer's."""
        if self.alsh_config.sync_active_set and _distributed():
            cfg = self.alsh_config
            dist.all_reduce(torch.zeros(cfg.tables, 1 << cfg.bits, dtype=torch.int64, device=self.planes.device))

    def _record_counts(self, count: torch.Tensor, read: torch.Tensor | None) -> None:
        """(active output channels, read input channels) of this forward; per sample, the rounded batch means."""
        count, read = _mean_count(count), None if read is None else _mean_count(read)
        read = torch.full_like(count, self.in_channels) if read is None else read
        self.last_active.copy_(torch.stack((count, read)))

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

    def extra_repr(self) -> str:
        c = self.alsh_config
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, L={c.tables}, K={c.bits}, "
            f"top_buckets={c.top_buckets}, m={c.m}" + (", shares_input" if self._share_source is not None else "")
        )


def _mean_count(count: torch.Tensor) -> torch.Tensor:
    """A 0-d count as it is; per-sample (N,) counts as their rounded mean (0-d int64, on the device)."""
    if count.dim() == 0:
        return count
    return count.to(torch.float64).mean().round().to(torch.int64)


def _expand_channels(x: torch.Tensor, in_idx: torch.Tensor, channels: int) -> torch.Tensor:
    """A compact input (the channels ``in_idx`` only, Alg. 6) back at full size, zeros elsewhere: what a per-sample
    layer needs when its per-batch producer handed over a compact output (layers with different selections)."""
    full = x.new_zeros(x.shape[0], channels, *x.shape[2:])
    return full.index_copy_(1, in_idx, x)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def exact_sets() -> bool:
    """Whether linked layers hand each other exact (data-sized) active sets and compact outputs (Alg. 6).

    Always in eager mode. Under ``torch.compile`` / ``torch.export`` only when Dynamo may capture ops whose output
    shape is data (``torch._dynamo.config.capture_dynamic_output_shape_ops = True``): the set's length is then an
    unbacked symbolic size. Otherwise traced layers hand each other the padded set with its 0-d count and
    full-size outputs, whose inactive channels are zero: the same values, no data-dependent shape, no graph
    break (the consumer still reads only the active channels)."""
    if not torch.compiler.is_compiling():
        return True
    return bool(torch._dynamo.config.capture_dynamic_output_shape_ops)


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
        # Inside a linked nn.Sequential the previous layer hands over only its active channels (Alg. 6).
        in_idx, in_count, read, compact_in = self._shared_input()
        check_conv_input(self, x, channels=in_idx.shape[-1] if compact_in else None)
        per_sample = x.shape[0] > 0 and self.per_sample()
        if compact_in and in_idx.dim() == 2 and not per_sample:
            # a per-sample producer's compact output (its rows), for a per-batch step: back at full size
            x, compact_in = _library.expand_rows(x, in_idx, in_count, self.in_channels), False
        if x.shape[0] == 0:
            self.sync_empty_batch()
            y = ops.active_conv2d(x, self.weight, self.bias, None, None, self.stride, self.padding, self.dilation)
        elif per_sample:
            # each sample's own set: (N, O) rows and (N,) counts, on the device
            if compact_in and in_idx.dim() == 1:  # a per-batch producer's compact output: the same set per sample
                x, in_count, compact_in = _expand_channels(x, in_idx, self.in_channels), None, False
            idx, count = self.active_filters(x, in_idx, in_count, compact_in)
            # Per-sample Alg. 6: inside the linked Sequential the output holds each sample's active channels alone,
            # (N, max count, H', W'), so the ReLU / pooling between the layers see that many channels; the
            # consumer reads them as they are (row j of sample n: filter idx[n, j]). The width is the largest
            # count (one host read: eager only, not under torch.compile nor torch.export, whose non-strict tracing
            # is not "compiling" but cannot read a count either) and the Triton kernels have no compact form, so
            # only on the torch backend; otherwise a full-size output, zero in each sample's inactive channels.
            compact_out = (self._emit_compact and self._compact_ok and not torch.compiler.is_compiling()
                           and not torch.compiler.is_exporting() and resolve_backend("sample_conv2d", x) == "torch")
            if compact_out:
                idx = idx[:, :int(count.max())]
            if self._publish:
                self._publish_set(idx, count, True, compact_out)
            y = ops.active_conv2d(x, self.weight, self.bias, idx, in_idx, self.stride, self.padding, self.dilation,
                                  out_count=count, in_count=in_count, compact_input=compact_in,
                                  compact_output=compact_out)
            self._record_counts(count, read)
        elif self._publish and exact_sets():
            # a linked consumer reads the exact set and (in the Sequential) the compact output of its channels alone;
            # the set's size reaches the host (one sync on CUDA; an unbacked size when traced)
            # compact only with a batch set in and out (per-sample input rows make per-sample outputs)
            compact_out = self._emit_compact and self._compact_ok and (in_idx is None or in_idx.dim() == 1)
            out_idx, count = self.active_filters(x, in_idx, in_count, compact_in)
            self._publish_set(out_idx, count, False, compact_out)
            y = ops.active_conv2d(
                x, self.weight, self.bias, out_idx, in_idx, self.stride, self.padding, self.dilation,
                compact_input=compact_in, compact_output=compact_out, in_count=in_count,
            )
            self._record_counts(count, read)
        else:
            # the set stays on the device with its count (no sync); a traced linked consumer gets it padded
            idx, count = self.active_filters(x, in_idx, in_count, compact_in, padded=True)
            if self._publish:
                self._publish_set(idx, count, True, False)
            y = ops.active_conv2d(
                x, self.weight, self.bias, idx, in_idx, self.stride, self.padding, self.dilation,
                compact_input=compact_in, out_count=count, in_count=in_count,
            )
            self._record_counts(count, read)
        return y.squeeze(0) if unbatched else y

    def param_count(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def dense_macs(self, out_h: int, out_w: int) -> int:
        return self.weight.numel() * out_h * out_w

    def macs(self, out_h: int, out_w: int) -> int:
        """Multiply-adds per sample at the last forward's active set: hashing (L*K projections of the read
        channels) plus the active filters on the read channels."""
        o, c = self.last_active_counts or (self.out_channels, self.in_channels)
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
