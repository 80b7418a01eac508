"""Hyperplane hashing of every im2col patch and the per-table bucket histogram, in PyTorch.

Feeney (2019), shared/papers/001, sec. 3.2.5 and 5.1: bit ``j`` of table ``t`` is ``b(x) = [a_{t,j}^T x >= 0]``
(eq. 3.3 / 5.1), the table's code is ``g(x) = sum_j b_j(x) << j`` (eq. 3.4), and the projections of all patches
are one convolution of the input with the hyperplanes as filters (sec. 5.1), never a materialized im2col.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._format import is_channels_last, out_hw

# bytes of one chunk's float32 input and projections in the CPU hash (:func:`hash_chunk`)
CHUNK_BYTES = 6 << 20


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
    n = x.shape[0]
    read = planes.shape[1] if in_idx is None else len(in_idx)
    chunk = hash_chunk(x, read, planes, stride, padding, dilation) if x.device.type == "cpu" else max(n, 1)
    if in_idx is not None:
        planes = planes.index_select(1, in_idx)
    parts = [_hash_chunk(x[i:i + chunk] if n > chunk else x, planes, bits, stride, padding, dilation, in_idx,
                         per_sample) for i in range(0, max(n, 1), chunk)]
    hists = [h for h, _ in parts]
    hist = torch.cat(hists) if per_sample else hists[0] if len(hists) == 1 else torch.stack(hists).sum(0)
    if return_codes:
        return hist, torch.cat([c for _, c in parts]).to(torch.int64)
    return hist


def hash_chunk(
    x: torch.Tensor,
    channels: int,
    planes: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> int:
    """Samples per chunk of the CPU hash of ``x`` reading ``channels`` of its channels with ``planes``: as many as
    keep one chunk's float32 input and projections (padded to 16) within :data:`CHUNK_BYTES`, at least one.

    A whole batch's projections of a large map are hundreds of MB (VGG's first layer at batch 64: 205 MB), which
    glibc's allocator maps fresh on every call (above its mmap threshold), so every pass over them pays a page
    fault per 4 KB; a chunk of a few samples stays in the allocator's heap and in the caches. The hash of
    (64, 3, 224, 224) took 469 ms whole and 115 ms in chunks of 4, (64, 128, 56, 56) in channels_last 42 against
    26 ms in chunks of 8; from 28x28 down chunks gain nothing (2 threads of this team's 2-core CPU, best of 4).
    With the allocator told to keep its memory (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, see the
    README) the whole batch and the chunks take about the same time.
    """
    ho, wo = out_hw(x, planes, stride, padding, dilation)
    per_image = 4 * (channels * x.shape[2] * x.shape[3] + max(16, planes.shape[0]) * ho * wo)
    return max(1, min(x.shape[0], CHUNK_BYTES // max(1, per_image)))


def _hash_chunk(
    x: torch.Tensor,
    planes: torch.Tensor,
    bits: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    in_idx: torch.Tensor | None,
    per_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hist, int32 codes) of the samples of ``x``; ``planes`` already restricted to ``in_idx``'s channels."""
    n_tables = planes.shape[0] // bits
    if in_idx is not None:
        x = x.index_select(1, in_idx)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.shape[1] == 0:  # nothing read: every projection is 0 (conv2d has no zero-channel form)
        proj = x.new_zeros(x.shape[0], planes.shape[0], *out_hw(x, planes, stride, padding, dilation))
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
    return hist, codes
