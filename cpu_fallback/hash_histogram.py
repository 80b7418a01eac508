"""Hyperplane hashing of every im2col patch and the per-table bucket histogram, in PyTorch.

Feeney (2019), shared/papers/001, sec. 3.2.5 and 5.1: bit ``j`` of table ``t`` is ``b(x) = [a_{t,j}^T x >= 0]``
(eq. 3.3 / 5.1), the table's code is ``g(x) = sum_j b_j(x) << j`` (eq. 3.4), and the projections of all patches
are one convolution of the input with the hyperplanes as filters (sec. 5.1), never a materialized im2col.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._format import is_channels_last


def torch_hash_histogram(
    x: torch.Tensor,
    planes: torch.Tensor,
    bits: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    in_idx: torch.Tensor | None = None,
    return_codes: bool = False,
    per_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Histogram (L, 2**bits) int64 of the codes of every patch of ``x`` (and the (N, L, H', W') codes); with
    ``per_sample`` one histogram per sample over its own patches, (N, L, 2**bits).

    ``planes`` is (L*bits, C, kh, kw); projection ``t*bits + j`` gives bit ``j`` of table ``t``. With ``in_idx``
    only those input channels are read (the result equals hashing ``x`` with the other channels zeroed).
    Projections run in float32 for half-precision inputs. Arguments are checked by ``tritonslide.ops``.
    """
    n_tables = planes.shape[0] // bits
    if in_idx is not None:
        x = x.index_select(1, in_idx)
        planes = planes.index_select(1, in_idx)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.shape[1] == 0:  # nothing read: every projection is 0 (conv2d has no zero-channel form)
        kh, kw = planes.shape[2:]
        ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        proj = x.new_zeros(x.shape[0], planes.shape[0], ho, wo)
    else:
        w = planes.to(x.dtype)
        if x.device.type == "cpu":
            if x.shape[1] <= 4 and not is_channels_last(x):
                # a network's first convolution (3 channels): oneDNN's NCHW path is slow for so few channels; the
                # channels_last copy and its convolution took 52 ms against 67 ms on AlexNet conv1's projections
                # (batch 64 at 224 px, 2 threads, best of 15 interleaved rounds), 4.1 against 7.6 ms at batch 8.
                # From 64 channels up the copy costs what it saves, so NCHW inputs stay NCHW
                x = x.contiguous(memory_format=torch.channels_last)
            if is_channels_last(x) and w.shape[0] % 16:
                # oneDNN's channels_last kernels block the output channels by 16: L*K = 15 projections padded
                # with one zero plane (its output sliced off) ran 1.4-2.2x faster on this CPU (AlexNet conv4's
                # (64, 384, 13, 13): 14.6 -> 8.3 ms; VGG's (64, 128, 56, 56): 103 -> 47 ms; conv1: 49 -> 42 ms)
                w = torch.cat([w, w.new_zeros(16 - w.shape[0] % 16, *w.shape[1:])])
        proj = F.conv2d(x, w, None, stride, padding, dilation)[:, :planes.shape[0]]
    n, _, ho, wo = proj.shape
    signs = (proj >= 0).unflatten(1, (n_tables, bits))  # a view in either memory format
    # Packing bit by bit keeps the temporaries at one int32 per (patch, table) instead of one int64 per bit.
    codes = signs[:, :, 0].to(torch.int32)
    for j in range(1, bits):
        codes |= signs[:, :, j].to(torch.int32) << j
    n_buckets = 1 << bits
    rows = n * n_tables if per_sample else n_tables  # one row of 2**bits counters per (sample,) table
    offsets = torch.arange(rows, device=x.device, dtype=torch.int64).view(-1, n_tables, 1, 1) * n_buckets
    hist = torch.bincount((codes + offsets).flatten(), minlength=rows * n_buckets)
    hist = hist.view(n, n_tables, n_buckets) if per_sample else hist.view(n_tables, n_buckets)
    if return_codes:
        return hist, codes.to(torch.int64)
    return hist
