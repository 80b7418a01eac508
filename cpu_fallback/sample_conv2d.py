"""Active-filter convolution with one active set PER SAMPLE, in PyTorch (issue #15).

Feeney (2019), shared/papers/001, Alg. 4-6 chooses one active set per batch; here sample ``n`` has its own output set
(row ``n`` of ``out_idx``, its first ``out_count[n]`` entries) and its own input set (row ``n`` of ``in_idx``, its
first ``in_count[n]`` entries), so a sample's output never depends on the other samples of its batch. Definition,
with ``m_out[n]`` / ``m_in[n]`` the 0/1 masks of sample ``n``'s sets:

    y[n]  = conv2d(x[n] * m_in[n], W, b) * m_out[n]
    dx[n] = m_in[n] * conv_transpose2d(dy[n] * m_out[n], W)
    dW    = sum_n m_out[n] m_in[n]^T (the per-sample weight gradient),   db = sum_n m_out[n] * sum_{oh, ow} dy[n]

Computation: samples with the same sets form a group (``torch.unique`` over the set masks), and each group runs one
convolution of exactly its active filters on exactly its read channels (``F.conv2d`` / ``convolution_backward`` on
the gathered rows), its result copied into the full-size output. No padding is computed. With per-sample ALSH sets
most groups hold one sample (64 samples of AlexNet at 224 px: 50-64 distinct sets per layer), so the cost is one
small convolution per sample; measured faster than the batched alternatives. On AlexNet's and VGG-11's layers at
batch 16 (1 thread, 40% of the filters on 40% of the channels per sample) the group loop took 0.8-1.9x the time of
one per-batch convolution with the same fractions, where an im2col + batched matmul over chunks of samples with
gathered weights took 1.6-4.3x (the unfold / gather copies and small-matrix GEMMs), and one convolution of all the
filters masked per sample does 2.5x (1 / 0.4) the multiply-adds. The groups run on worker threads with one
intra-op thread each (``_workers.py``: parts of about equal multiply-adds, a fixed partition; dW and db are summed
per part, then over the parts in order, so a run repeats bitwise).

Index rows: ``out_idx`` (N, Ko) int64 and ``out_count`` (N,) int64; ``out_count=None`` means every entry of the row.
``in_idx`` / ``in_count`` likewise, or ``None`` (every input channel). Entries past a count are never read.

Compact forms (the per-sample Alg. 6 hand-off): with ``compact_input`` x is (N, Ki, H, W) and its channel ``j`` of
sample ``n`` is input channel ``in_idx[n, j]`` for ``j < in_count[n]`` (the channels past the count are never read);
with ``compact_output`` y is (N, Ko, H', W'), its channel ``j`` of sample ``n`` is filter ``out_idx[n, j]``, zero
past the count. A group then reads and writes slices of the compact tensors instead of gathering channels, and the
layers between two linked ALSH layers (ReLU, pooling) see Ko channels instead of O: on AlexNet at batch 64 (this
CPU, 2 threads) ReLU + max-pool after conv1 took 37 ms on the compact (64, 38, 55, 55) output against 86 ms at
full size, and the zero-filled full-size output alone cost 23 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._format import is_channels_last
from ._gather import add_block, take_block
from ._workers import map_parts


def _masks(idx: torch.Tensor | None, count: torch.Tensor | None, n: int, size: int) -> torch.Tensor | None:
    """(N, size) bool masks of per-sample sets (entries past a row's count ignored, whatever they hold)."""
    if idx is None:
        return None
    valid = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    if count is not None:
        valid = torch.arange(idx.shape[1], device=idx.device)[None, :] < count[:, None]
    mask = torch.zeros(n, size, dtype=torch.bool, device=idx.device)
    # scatter of the valid flags with "amax": a padding entry (False) never clears an active one
    return mask.scatter_reduce_(1, idx, valid, reduce="amax")


def _groups(out_mask: torch.Tensor, in_mask: torch.Tensor | None) -> tuple[list, list[float]]:
    """``(groups, costs)``: one ``(samples, out_set, in_set)`` per group of samples that share both sets (``in_set``
    None: all channels), and each group's relative cost (samples x filters x read channels; channels 1 when every
    group reads all of them). One ``torch.unique`` over the concatenated masks; the host reads the groups (free on
    the CPU)."""
    key = out_mask if in_mask is None else torch.cat([out_mask, in_mask], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    sizes = torch.bincount(inverse, minlength=uniq.shape[0])
    o = out_mask.shape[1]
    filters = uniq[:, :o].sum(1)
    channels = uniq[:, o:].sum(1) if in_mask is not None else torch.full_like(filters, 1)
    costs = (sizes * filters * channels).tolist()
    groups = []
    for g, (start, size) in enumerate(zip((torch.cumsum(sizes, 0) - sizes).tolist(), sizes.tolist())):
        out_set = uniq[g, :o].nonzero().view(-1)
        in_set = None if in_mask is None else uniq[g, o:].nonzero().view(-1)
        groups.append((order[start:start + size], out_set, in_set))
    return groups, costs


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _take(x: torch.Tensor, samples: torch.Tensor, channels: torch.Tensor | None, compact: bool = False) -> torch.Tensor:
    """x's ``channels`` of the group's samples: a gather, or with ``compact`` the first ``len(channels)`` channels
    (a view for a group of one sample, the usual case per sample)."""
    # a slice, not x[i].unsqueeze(0): the unsqueezed view's batch stride (3 instead of C*H*W) sent oneDNN down a slow
    # path for channels_last x (AlexNet conv1 per sample in a channels_last model: 103 -> 61 ms)
    xs = x[int(samples[0]):int(samples[0]) + 1] if samples.numel() == 1 else x.index_select(0, samples)
    if channels is not None:
        xs = xs[:, :channels.numel()] if compact else xs.index_select(1, channels)
    # index_select returns NCHW: a channels_last x keeps its format (a no-op for a view that already has it), or the
    # group's convolution takes oneDNN's NCHW path (the same model's conv1, 7 groups of several samples)
    return xs.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else xs


def _put(y: torch.Tensor, samples: torch.Tensor, channels: torch.Tensor, value: torch.Tensor,
         compact: bool = False) -> None:
    """``y[samples, channels] = value`` (a row copy for a group of one sample); with ``compact`` into the first
    ``len(channels)`` channels."""
    if compact:
        k = channels.numel()
        if samples.numel() == 1:
            y[int(samples[0]), :k].copy_(value[0])
        else:
            y[samples, :k] = value
    elif samples.numel() == 1:
        y[int(samples[0])].index_copy_(0, channels, value[0])
    else:
        y[samples[:, None], channels[None, :]] = value


def _zero_tail(t: torch.Tensor, samples: torch.Tensor, k: int) -> None:
    """``t[samples, k:] = 0``: a compact tensor's channels past a group's count (the group owns its samples' rows,
    so no pass over the whole tensor zeroes them first)."""
    if k >= t.shape[1]:
        return
    if samples.numel() == 1:
        t[int(samples[0]), k:].zero_()
    else:
        t[samples, k:] = 0


def torch_sample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_idx: torch.Tensor,
    out_count: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    in_count: torch.Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    compact_input: bool = False,
    compact_output: bool = False,
) -> torch.Tensor:
    """``y[n] = conv2d(x[n] * m_in[n], W, b) * m_out[n]``, computing only each sample's active filters on its read
    channels. Full-size (N, O, H', W') output in x's memory format, zero outside each sample's set; the compact
    forms of the module docstring with ``compact_input`` / ``compact_output``."""
    n = x.shape[0]
    c = weight.shape[1]
    o, _, kh, kw = weight.shape
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    width = out_idx.shape[1] if compact_output else o
    y = torch.empty((n, width, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if not compact_output:  # inactive channels lie anywhere: zero them all first; compact rows zero their own tails
        y.zero_()
    if n == 0:
        return y
    # half precision runs each group's convolution in float32: the CPU kernels' half-precision paths for a batch of
    # one sample accumulated in low precision (dx off by 9% on a 63-term sum in bfloat16)
    acc = _accumulation_dtype(x.dtype)
    groups, costs = _groups(_masks(out_idx, out_count, n, o), _masks(in_idx, in_count, n, c))
    # one contiguous copy of a channels_last weight (a model moved to channels_last) here, not one per group inside
    # take_block: AlexNet conv3's 64 per-sample gathers cost 45 ms of copies that way
    weight = weight.contiguous()

    def run(part: list) -> None:  # each group writes only its own samples of y
        for samples, out_set, in_set in part:
            if compact_output:
                # the rows past the count are zero; so are those below it when nothing is read and there is no bias
                nothing = out_set.numel() == 0 or (in_set is not None and in_set.numel() == 0 and bias is None)
                _zero_tail(y, samples, 0 if nothing else out_set.numel())
            if out_set.numel() == 0:
                continue
            b = None if bias is None else bias.index_select(0, out_set)
            if in_set is not None and in_set.numel() == 0:  # nothing read: only the bias
                if b is not None:
                    _put(y, samples, out_set, b[None, :, None, None].expand(len(samples), -1, ho, wo),
                         compact_output)
                continue
            w = take_block(weight, out_set, in_set)
            xs = _take(x, samples, in_set, compact_input)
            if xs.dtype != acc:
                xs, w, b = xs.to(acc), w.to(acc), None if b is None else b.to(acc)
            _put(y, samples, out_set, F.conv2d(xs, w, b, stride, padding, dilation).to(x.dtype), compact_output)

    map_parts(run, groups, costs)
    return y


def torch_sample_conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    out_idx: torch.Tensor,
    out_count: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    in_count: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs: tuple[bool, bool, bool],
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx, dW, db)`` of :func:`torch_sample_conv2d` (the module docstring's formulas); each sample
    reaches only its own active rows of dW and its own read channels of dx. ``grad_y`` and dx in the compact forms
    of the flags."""
    need_x, need_w, need_b = needs[0], needs[1], needs[2] and has_bias
    n = x.shape[0]
    o, c = weight.shape[:2]
    # float32 for half-precision inputs, as in the forward; sums over groups then round once at the end
    acc = _accumulation_dtype(x.dtype)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_x else None
    if need_x and not compact_input:  # as y in the forward: compact rows zero their own tails (in the groups)
        dx.zero_()
    weight = weight.contiguous()  # once, not per group (as in the forward)

    def run(part: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # dx rows belong to one group each; dW and db are summed per part, then over the parts in order
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(o, dtype=acc, device=weight.device) if need_b else None
        for samples, out_set, in_set in part:
            if need_x and compact_input:
                # a sample's dx channels past its count are zero; those it reads are written below, or zero too
                # when the group computes no dx term
                k = in_set.numel() if in_set is not None else 0
                writes = out_set.numel() > 0 and k > 0
                _zero_tail(dx, samples, k if writes else 0)
            if out_set.numel() == 0:
                continue
            g = _take(grad_y, samples, out_set, compact_output)
            if need_b:
                db.index_add_(0, out_set, g.sum((0, 2, 3), dtype=acc))
            if in_set is not None and in_set.numel() == 0 or not (need_x or need_w):
                continue
            w = take_block(weight, out_set, in_set)
            dx_grp, dw_grp, _ = torch.ops.aten.convolution_backward(
                # dy in x's format: an NCHW dy beside a channels_last x sends oneDNN down a reordering path
                g.to(acc).contiguous(memory_format=fmt), _take(x, samples, in_set, compact_input).to(acc),
                w.to(acc), None, list(stride), list(padding), list(dilation), False, [0, 0], 1, [need_x, need_w, False],
            )
            if need_w:
                add_block(dw, out_set, in_set, dw_grp.to(acc))
            if need_x:
                if in_set is None:
                    dx[samples] = dx_grp.to(x.dtype)
                else:
                    _put(dx, samples, in_set, dx_grp.to(x.dtype), compact_input)
        return dw, db

    if n and (need_x or need_w or need_b):
        parts = map_parts(run, *_groups(_masks(out_idx, out_count, n, o), _masks(in_idx, in_count, n, c)))
    else:
        parts = [run([])]
    dw, db = parts[0]
    for dw_part, db_part in parts[1:]:
        if need_w:
            dw += dw_part
        if need_b:
            db += db_part
    return dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(weight.dtype)
