"""Hyperplane hashing of every im2col patch and the per-table bucket histogram, in PyTorch.

Feeney (2019), shared/papers/001, sec. 3.2.5 and 5.1: bit ``j`` of table ``t`` is ``b(x) = [a_{t,j}^T x >= 0]``
(eq. 3.3 / 5.1), the table's code is ``g(x) = sum_j b_j(x) << j`` (eq. 3.4), and the projections of all patches
are one convolution of the input with the hyperplanes as filters (sec. 5.1), never a materialized im2col.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._format import is_channels_last, out_hw
from ._rows import expand_rows, rows_valid

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


def torch_hash_histogram_rows(
    x: torch.Tensor,
    in_idx: torch.Tensor,
    in_count: torch.Tensor | None,
    planes: torch.Tensor,
    bits: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    return_codes: bool = False,
    per_sample: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`torch_hash_histogram` of a per-sample compact input (issue #15): channel ``j`` of sample ``n`` of the
    (N, k, H, W) ``x`` is input channel ``in_idx[n, j]`` for ``j < in_count[n]`` (channels past the count are never
    read); ``planes`` are the layer's (L*bits, C, kh, kw). Equals hashing each sample's full-size input, zero
    outside its channels. In chunks of samples (:data:`CHUNK_BYTES`); a stride-1 layer of at most 3x3 taps by
    :func:`_tap_projections` (no full-size input), any other by expanding each chunk to full size."""
    n, c = x.shape[0], planes.shape[1]
    if n == 0:
        return torch_hash_histogram(x.new_empty(0, c, *x.shape[2:]), planes, bits, stride, padding, dilation,
                                    None, return_codes, per_sample)
    by_taps = _by_taps(planes, stride)
    if by_taps:
        taps = planes.shape[2] * planes.shape[3]
        per_image = 4 * (x.shape[1] + planes.shape[0] * taps) * x.shape[2] * x.shape[3]
        chunk = max(1, min(n, CHUNK_BYTES // max(1, per_image)))
        # (C + 1, L*bits * kh * kw): channel c's plane entries, tap by tap, and a zero row for the padding entries
        by_channel = planes.permute(1, 0, 2, 3).reshape(c, -1)
        by_channel = torch.cat([by_channel, by_channel.new_zeros(1, by_channel.shape[1])])
    else:
        chunk = hash_chunk(x, c, planes, stride, padding, dilation)
    parts = []
    for i in range(0, n, chunk):
        rows = slice(i, i + chunk)
        xc, idx, count = x[rows], in_idx[rows], None if in_count is None else in_count[rows]
        if by_taps:
            proj = _tap_projections(xc, idx, count, by_channel, planes.shape, padding, dilation)
            parts.append(_count(proj, bits, per_sample))
        else:
            full = expand_rows(xc, idx, count, c, torch.channels_last)
            parts.append(_hash_chunk(full, planes, bits, stride, padding, dilation, None, per_sample))
    hists = [h for h, _ in parts]
    hist = torch.cat(hists) if per_sample else torch.stack(hists).sum(0)
    if return_codes:
        return hist, torch.cat([codes for _, codes in parts]).to(torch.int64)
    return hist


def _by_taps(planes: torch.Tensor, stride: tuple[int, int]) -> bool:
    """Whether :func:`torch_hash_histogram_rows` projects by taps: stride 1 and at most 9 taps. Per-sample compact
    inputs captured from AlexNet and VGG-11 at batch 64 (2 threads of this team's CPU, 2026-12-04, best of 4x6 calls
    in turn), expanded / by taps: VGG-11's 3x3 layers 112 px with 22 of 64 channels 127 / 85 ms, 56 px with 65 of
    128 63 / 39, with 121 of 256 125 / 70, 28 px with 129 of 256 31 / 19, with 277 of 512 99 / 35, 14 px with 317 and
    263 of 512 15.7 / 11.6 and 16.3 / 9.9; AlexNet's 13 px layers 5.4 / 3.8, 12.2 / 5.9 and 6.3 / 4.7 ms; but
    AlexNet's 5x5 layer (27 px, 38 of 64 channels) 14.1 / 19.4 ms: 25 taps make the tap products 10x its input."""
    return stride == (1, 1) and planes.shape[2] * planes.shape[3] <= 9


# the channel block of :func:`_tap_projections`' products (see there)
TAP_CHANNEL_BLOCK = 128


def _tap_projections(
    x: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor | None,
    by_channel: torch.Tensor,
    planes_shape: torch.Size,
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """(N, L*bits, H', W') stride-1 projections of a compact chunk, without its full-size input: each sample's
    plane entries of its own channels (a gather of ``by_channel`` rows) times its compact input, one batched
    matmul giving every (plane, tap) product at every input position, then the taps shifted onto the output
    positions and summed (in tap order). Summed over blocks of :data:`TAP_CHANNEL_BLOCK` compact channels: the
    matmul's rounding then does not depend on how wide the chunk's rows are (the widest sample's count), so a
    sample's projections are bitwise the same alone and in any batch (measured: with one matmul over more than 256
    channels they were not)."""
    n, k, h, w = x.shape
    n_planes, c, kh, kw = planes_shape
    acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    valid = rows_valid(idx, count)
    # (N, k, planes * taps): zero rows for entries past a count, whose channels are never read (NaN included)
    g = by_channel.to(acc).index_select(0, torch.where(valid, idx, c).view(-1)).view(n, k, -1).transpose(1, 2)
    xs = torch.where(valid[:, :, None, None], x, 0).to(acc).reshape(n, k, h * w)
    z = torch.bmm(g[:, :, :TAP_CHANNEL_BLOCK], xs[:, :TAP_CHANNEL_BLOCK])
    for s in range(TAP_CHANNEL_BLOCK, k, TAP_CHANNEL_BLOCK):
        z.baddbmm_(g[:, :, s:s + TAP_CHANNEL_BLOCK], xs[:, s:s + TAP_CHANNEL_BLOCK])
    z = z.view(n, n_planes, kh, kw, h, w)
    (ph, pw), (dh, dw) = padding, dilation
    ho, wo = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    out = z.new_zeros(n, n_planes, max(ho, 0), max(wo, 0))
    for i in range(kh):
        # output row oy reads input row oy + i * dh - ph: the rows where that lies inside the input
        r0, r1 = max(0, ph - i * dh), min(ho, h + ph - i * dh)
        for j in range(kw):
            c0, c1 = max(0, pw - j * dw), min(wo, w + pw - j * dw)
            if r1 > r0 and c1 > c0:
                out[:, :, r0:r1, c0:c1] += z[:, :, i, j, r0 + i * dh - ph:r1 + i * dh - ph,
                                             c0 + j * dw - pw:c1 + j * dw - pw]
    return out


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
        proj = F.conv2d(x, w, None, stride, padding, dilation)
    return _count(proj[:, :planes.shape[0]], bits, per_sample)


def _count(proj: torch.Tensor, bits: int, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hist, int32 codes) of the (N, L*bits, H', W') projections: the sign bits packed per table, then counted."""
    n, n_planes, ho, wo = proj.shape
    n_tables = n_planes // bits
    signs = (proj >= 0).unflatten(1, (n_tables, bits))  # a view in either memory format
    # Packing bit by bit keeps the temporaries at one int32 per (patch, table) instead of one int64 per bit.
    codes = signs[:, :, 0].to(torch.int32)
    for j in range(1, bits):
        codes |= signs[:, :, j].to(torch.int32) << j
    n_buckets = 1 << bits
    rows = n * n_tables if per_sample else n_tables  # one row of 2**bits counters per (sample,) table
    offsets = torch.arange(rows, device=proj.device, dtype=torch.int64).view(-1, n_tables, 1, 1) * n_buckets
    hist = torch.bincount((codes + offsets).flatten(), minlength=rows * n_buckets)
    hist = hist.view(n, n_tables, n_buckets) if per_sample else hist.view(n_tables, n_buckets)
    return hist, codes
