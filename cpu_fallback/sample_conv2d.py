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
filters masked per sample does 2.5x (1 / 0.4) the multiply-adds. A large group's convolution calls oneDNN on its
block padded to rounded sizes (``_group_conv``: a bounded set of shapes the primitive cache keeps; AlexNet's
per-sample calls at batch 64 in 172 -> 154 ms on 1 thread, 120 -> 110 ms on 2). The groups run on worker threads
with one intra-op thread each (``_workers.py``: parts of about equal multiply-adds, a fixed partition; dW and db are
summed per part, then over the parts in order, so a run repeats bitwise).

Small layers are the exception: where each sample's convolution is so small that the loop's fixed cost per group
dominates (ResNet-56's 3x3 layers at 32-8 px, the digits CNNs' deeper layers), one masked convolution over the whole
batch is the faster exact computation, 2-4x on ResNet-56's layers. It convolves the batch's union of active filters
on the union of read channels where that pays (``_union``; on the digits cnn8's three ALSH layers at batch 64 the
unions hold 18 of 32, 38 of 64 and 80 of 128 filters, and the last two pay), else every filter (AlexNet's sets cover
them all). A cost rule (``_masked_pays``, constants measured below) picks between the two forms per call;
``TRITONSLIDE_CPU_SAMPLE_CONV=groups`` / ``masked`` forces one.

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

import os

import torch
import torch.nn.functional as F

from ._format import is_channels_last, out_hw, zeros_like_format
from ._gather import add_block, take_block
from ._rows import rows_valid as _valid
from ._workers import map_parts


def _masks(idx: torch.Tensor | None, count: torch.Tensor | None, n: int, size: int) -> torch.Tensor | None:
    """(N, size) bool masks of per-sample sets (entries past a row's count ignored, whatever they hold)."""
    if idx is None:
        return None
    mask = torch.zeros(n, size, dtype=torch.bool, device=idx.device)
    # scatter of the valid flags with "amax": a padding entry (False) never clears an active one
    return mask.scatter_reduce_(1, idx, _valid(idx, count), reduce="amax")


def _distinct_sets(out_mask: torch.Tensor, in_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uniq, inverse)``: the distinct (output set, input set) mask rows and each sample's row among them (one
    ``torch.unique`` over the concatenated masks)."""
    key = out_mask if in_mask is None else torch.cat([out_mask, in_mask], 1)
    return torch.unique(key, dim=0, return_inverse=True)


def _groups(out_mask: torch.Tensor, in_mask: torch.Tensor | None,
            distinct: tuple[torch.Tensor, torch.Tensor]) -> tuple[list, list[float]]:
    """``(groups, costs)``: one ``(samples, out_set, in_set)`` per group of samples that share both sets (``in_set``
    None: all channels; ``distinct``: :func:`_distinct_sets`), and each group's relative cost (samples x filters x
    read channels; channels 1 when every group reads all of them). The host reads the groups (free on the CPU; a
    few Python steps per group, which is why the masked form never builds them)."""
    uniq, inverse = distinct
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


def _rounded(v: int) -> int:
    """A block size rounded up for oneDNN: to a multiple of 16 from 40 (AVX-512 holds 16 floats), of 8 from 8,
    exact below."""
    q = 16 if v >= 40 else 8 if v >= 8 else 1
    return -(-v // q) * q


# Each group's convolution has its own (filters, channels) shape. A shape oneDNN has not seen costs a new primitive,
# and ATen sends a batch-1 convolution of a <= 3x3 kernel over at most 20480 input elements (AlexNet conv3's ~80
# channels at 13x13) to its own im2col path. So a large enough group calls oneDNN itself on its block padded to
# rounded sizes (zero filters, zero channels): a few shapes per layer that the primitive cache keeps, at the sizes
# its kernels are fastest on. Per-sample 3x3 convolutions of fresh random shapes (+-30% around the mean), 64 per
# round, exact multiply-adds per second on 1 thread of this team's CPU, F.conv2d -> padded oneDNN: 13x13 with ~80 /
# ~120 channels (18 M multiply-adds each) 38 / 32 -> 58 / 55 GMAC/s, 27x27 (15 M) 33 -> 55, 28x28 (23 M) 35 -> 63,
# 56x56 (141 M) 54 -> 75, 14x14 with 64 channels (7 M) 34 -> 47; but small ones lose to ATen's path, whose fixed
# cost is lower: 14x14 with 30 channels (3.2 M) 33 -> 29, 28x28 with 20 (5.6 M) 34 -> 34. Hence the threshold.
_ONEDNN_MIN_MACS = 6e6


def _onednn(x: torch.Tensor, macs: float) -> bool:
    """Whether a group's convolution of ``macs`` multiply-adds calls oneDNN itself: float32 on the CPU, a torch
    built with oneDNN that has it enabled (``torch.backends.mkldnn.flags``), and the op ``torch.mkldnn_convolution``
    (undocumented: a torch without it keeps ``F.conv2d``)."""
    return (macs >= _ONEDNN_MIN_MACS and x.dtype == torch.float32 and x.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch, "mkldnn_convolution"))


def _group_conv(xs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_set: torch.Tensor,
                in_set: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], out_hw: int) -> torch.Tensor:
    """``conv2d(xs, W[out_set][:, in_set], b[out_set])`` for one group: ``xs`` holds its read channels in
    ``in_set``'s order (every channel for None); ``weight`` is :func:`_padded_weight`'s (W with a zero filter and a
    zero channel appended), ``bias`` the layer's; ``out_hw`` the output's H' x W'. Padded on oneDNN (above) when
    large enough, else ``F.conv2d`` on the exact block."""
    o, c = out_set.numel(), xs.shape[1]
    cols = in_set if in_set is not None else torch.arange(c, device=xs.device)
    if not _onednn(xs, xs.shape[0] * o * c * weight.shape[2] * weight.shape[3] * out_hw):
        b = None if bias is None else bias.index_select(0, out_set)
        return F.conv2d(xs, take_block(weight, out_set, cols), b, stride, padding, dilation)
    po, pc = _rounded(o), _rounded(c)
    # padding entries point at the appended zero filter and zero channel: one gather builds the padded block
    w = take_block(weight, F.pad(out_set, (0, po - o), value=weight.shape[0] - 1),
                   F.pad(cols, (0, pc - c), value=weight.shape[1] - 1))
    if pc != c:  # zero channels (F.pad keeps the layout), never a copy of a read one, whose inf or NaN would meet
        xs = F.pad(xs, (0, 0, 0, 0, 0, pc - c))  # a zero weight
    b = None if bias is None else F.pad(bias.index_select(0, out_set), (0, po - o))
    y = torch.mkldnn_convolution(xs, w, b, list(padding), list(stride), list(dilation), 1)
    return y[:, :o] if po != o else y


def _padded_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a contiguous (O + 1, C + 1, kh, kw) tensor with a zero filter and a zero channel appended:
    what :func:`_group_conv`'s padding entries gather (one copy per call, not one per group)."""
    return F.pad(weight, (0, 0, 0, 0, 0, 1, 0, 1)).contiguous()


def _zero_tail(t: torch.Tensor, samples: torch.Tensor, k: int) -> None:
    """``t[samples, k:] = 0``: a compact tensor's channels past a group's count (the group owns its samples' rows,
    so no pass over the whole tensor zeroes them first)."""
    if k >= t.shape[1]:
        return
    if samples.numel() == 1:
        t[int(samples[0]), k:].zero_()
    else:
        t[samples, k:] = 0


# Which computation a per-sample convolution uses. The group loop computes exactly each sample's filters on its
# channels, one small convolution per group: its cost is a fixed overhead per group (gathers, dispatch, a batch-1
# convolution's setup) plus multiply-adds at a batch-1 convolution's rate, which drops on small maps (few output
# positions to block over). The masked form runs ONE convolution over every sample of the filters some sample computes
# on the channels some sample reads (inputs zero outside each sample's read channels, outputs kept only in its active
# filters): the union's multiply-adds at the batched rate, plus passes over the full-width input and output (masking,
# gathering). In multiply-adds of the batched convolution: a
# group costs _GROUP_OVERHEAD_MACS, an exact multiply-add _BATCH1_COST * (1 + _SMALL_MAP / P) with P a group's output
# positions (H' W' times its mean size), an element of the full-width input or output _ELEMENT_MACS; the masked form is
# taken when its estimate times _MASKED_MARGIN stays below the loop's. Least-squares fit (relative errors) to 18 layers
# measured with each form forced, batch 64 (16 / 32 where named), 2 threads, this team's CPU, 2026-12-03, with the
# loop's oneDNN blocks (loop / masked ms): ResNet-56's 16@32 / 32@16 / 64@8 px 8.3 / 3.8 / 5.8 against 4.6 / 1.2 / 1.1;
# the digits CNNs' 32->64@28, linked 64@14 and 128@7: 13.6 / 7.2 / 7.1 against 10.8 / 3.7 / 3.0; AlexNet's linked conv4
# / conv5 27.1 / 20.4 against 51.5 / 32.5; VGG's linked 128->256@56 (batch 16) and 512@14 (batch 64 / 16) 25.1 / 61.8 /
# 19.4 against 113.4 / 164.4 / 37.8; ResNet-18's 64@56 / 128@28 / 256@14 / 512@7 (batch 64 / 32) 40.5 / 35.3 / 41.6 /
# 68.0 / 42.3 against 84.6 / 45.7 / 41.2 / 35.8 / 18.6; 192@10 and linked 256@7 21.4 / 16.9 against 11.0 / 10.1. The
# rule, on those layers' sets (drawn as in the measurement), picks the faster form on all 18; the previous rule, without
# the small-map term, kept ResNet-18's 512@7 layers in the loop, 1.9-2.3x slower. VGG-11's 3-channel first layer (a 0.8
# GB full-width output at batch 64) stays in the loop by the element term. A judgment from those points, which
# ``TRITONSLIDE_CPU_SAMPLE_CONV`` overrides.
_GROUP_OVERHEAD_MACS = 15.8e6
_BATCH1_COST = 1.98
_SMALL_MAP = 100.0
_ELEMENT_MACS = 196.0
_MASKED_MARGIN = 1.1
_PATHS = ("auto", "groups", "masked")


def _path() -> str:
    """``TRITONSLIDE_CPU_SAMPLE_CONV``: ``auto`` (default: by the cost rule above), ``groups`` or ``masked``."""
    path = os.environ.get("TRITONSLIDE_CPU_SAMPLE_CONV", "") or "auto"
    if path not in _PATHS:
        raise ValueError(f"TRITONSLIDE_CPU_SAMPLE_CONV must be one of {_PATHS}, got {path!r}")
    return path


def _masked_pays(out_mask: torch.Tensor, in_mask: torch.Tensor | None, c: int, n_groups: int, kernel: int,
                 in_hw: int, out_hw: int) -> bool:
    """Whether one masked convolution of the batch's union (``c`` input channels, ``kernel`` = kh kw taps, ``in_hw`` /
    ``out_hw`` input / output positions) is cheaper than the loop over ``n_groups`` groups, by the rule above (or
    as ``TRITONSLIDE_CPU_SAMPLE_CONV`` says)."""
    path = _path()
    if c == 0:  # conv2d has no zero-channel form; the loop writes the bias alone
        return False
    if path != "auto":
        return path == "masked"
    n, o = out_mask.shape
    reads = in_mask.sum(1) if in_mask is not None else c
    exact = float((out_mask.sum(1) * reads).sum()) * kernel * out_hw
    # the masked form convolves the batch's union of filters on the union of read channels where that pays (_union)
    o_used = _union_size(out_mask)
    c_used = _union_size(in_mask) if in_mask is not None else c
    masked = n * o_used * c_used * kernel * out_hw + _ELEMENT_MACS * n * (c * in_hw + o * out_hw)
    # a group's convolution blocks over its samples' positions: a group of several samples is no small map
    positions = max(out_hw * n / max(n_groups, 1), 1)
    loop = n_groups * _GROUP_OVERHEAD_MACS + _BATCH1_COST * (1 + _SMALL_MAP / positions) * exact
    return _MASKED_MARGIN * masked < loop


def _scatter_channels(src: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, H, W) in ``src``'s format: channel ``idx[n, j]`` = ``src[n, j]`` for valid entries, zero elsewhere
    (padding entries add zero, so one that repeats an active index changes nothing; NaN past a count is dropped)."""
    n, k = idx.shape
    hw = src.shape[2:]
    src = torch.where(valid[:, :, None, None], src, 0)
    if is_channels_last(src):  # scatter along the innermost dimension of an NHWC buffer
        full = src.new_zeros((n, *hw, size))
        full.scatter_add_(3, idx[:, None, None, :].expand(n, *hw, k), src.permute(0, 2, 3, 1))
        return full.permute(0, 3, 1, 2)
    return src.new_zeros((n, size, *hw)).scatter_add_(1, idx[:, :, None, None].expand(n, k, *hw), src)


def _gather_channels(full: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The compact (N, k, H, W) rows of a full-size tensor, in its format: channel ``j`` of sample ``n`` is
    ``full[n, idx[n, j]]``, zero where ``valid`` is False."""
    n, k = idx.shape
    hw = full.shape[2:]
    if is_channels_last(full):
        taken = full.permute(0, 2, 3, 1).gather(3, idx[:, None, None, :].expand(n, *hw, k)).permute(0, 3, 1, 2)
    else:
        taken = full.gather(1, idx[:, :, None, None].expand(n, k, *hw))
    return torch.where(valid[:, :, None, None], taken, 0)


# The masked form convolves only the filters some sample of the batch computes (and the channels some sample reads)
# where that union, rounded up to a size oneDNN blocks well (_rounded: the padding entries are filters no sample uses,
# computed and dropped), leaves out at least one block of 16 (oneDNN's AVX-512 kernels block channels by 16) and is at
# most _UNION_FRACTION of the layer: below that the saved multiply-adds outweigh the extra gathers and the pass that
# widens the output again. Median of 40 interleaved calls, batch 64, sets of 40% of the filters drawn from a union,
# this team's CPU, 2026-12-04 (full -> union ms; two runs): 128@7 with 80 of 128 filters 4.00 / 4.10 -> 2.90 / 3.04,
# 64@14 with 38 (40 rounded) of 64 4.94 / 4.80 -> 4.08 / 4.02, 64@8 with 32 / 48 / 56 of 64 1.54 -> 1.05 / 1.39 /
# 1.69, 32@16 with 16 / 24 / 28 of 32 1.93 -> 1.38 / 1.99 / 2.05; 32@28 with 18 (24 rounded) of 32 lost, 6.91 / 7.31
# -> 7.76 / 8.17 (a 3x3 convolution of 32 channels at 28x28 took as long with 16-32 filters: memory-bound).
_UNION_FRACTION = 0.75
_UNION_MIN_SAVED = 16


def _union_padded(used: torch.Tensor) -> int | None:
    """The size the masked form computes for a union ``used`` (bool, one flag per index): rounded up (``_rounded``),
    or None for every index (the union saves too little to pay, see above, or is empty)."""
    size, count = used.numel(), int(used.sum())
    padded = _rounded(count)
    if count == 0 or padded > _UNION_FRACTION * size or size - padded < _UNION_MIN_SAVED:
        return None
    return padded


def _union(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(sel, pos)``: the indices the masked form computes, the batch's union of ``mask``'s rows padded with the
    lowest unused indices to :func:`_union_padded`'s size (ascending), and, (size,), each index's place among them;
    ``(None, None)`` for every index, or without a mask."""
    if mask is None:
        return None, None
    used = mask.any(0)
    padded = _union_padded(used)
    if padded is None:
        return None, None
    count = int(used.sum())
    if padded > count:  # the first unused indices fill the rounded size
        unused = (~used).nonzero().view(-1)[:padded - count]
        used = used.clone().index_fill_(0, unused, True)
    return used.nonzero().view(-1), torch.cumsum(used, 0) - 1


def _union_size(mask: torch.Tensor) -> int:
    """How many indices the masked form computes for ``mask`` (:func:`_union`), without building them (the cost
    rule asks before the form runs)."""
    padded = _union_padded(mask.any(0))
    return mask.shape[1] if padded is None else padded


def _union_rows(idx: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """Index rows renumbered into the union (:func:`_union`'s ``pos``; entries past a count point at 0)."""
    if pos is None:
        return idx
    return torch.where(valid, pos.index_select(0, torch.where(valid, idx, 0).view(-1)).view(idx.shape), 0)


def _union_cols(mask: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    return mask if sel is None else mask.index_select(1, sel)


def _widen(t: torch.Tensor, sel: torch.Tensor | None, size: int) -> torch.Tensor:
    """(N, size, ...) in ``t``'s format: channel ``sel[j]`` is ``t``'s channel ``j``, every other one zero."""
    if sel is None:
        return t
    return zeros_like_format(t, t.shape[0], size, *t.shape[2:]).index_copy_(1, sel, t)


def _masked_input(x: torch.Tensor, in_idx: torch.Tensor | None, in_count: torch.Tensor | None,
                  in_mask: torch.Tensor | None, c: int, compact_input: bool,
                  union: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """x at full width, zero outside each sample's read channels (``where``, not a product: what lies outside a
    sample's set is never read, NaN included); with ``union`` (:func:`_union` of ``in_mask``) only the channels some
    sample reads, in ascending order."""
    sel, pos = union
    if compact_input:
        valid = _valid(in_idx, in_count)
        return _scatter_channels(x, _union_rows(in_idx, valid, pos), valid, c if sel is None else sel.numel())
    if in_mask is None:
        return x
    return torch.where(_union_cols(in_mask, sel)[:, :, None, None], x if sel is None else x.index_select(1, sel), 0)


def _masked_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_idx: torch.Tensor,
                    out_count: torch.Tensor | None, out_mask: torch.Tensor, in_idx: torch.Tensor | None,
                    in_count: torch.Tensor | None, in_mask: torch.Tensor | None, stride: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int], compact_input: bool, compact_output: bool,
                    acc: torch.dtype) -> torch.Tensor:
    """The masked form: one convolution of the batch's union of active filters on the union of read channels,
    inputs zero outside each sample's read channels, outputs kept only in its active filters."""
    o, c = weight.shape[:2]
    out_union, in_union = _union(out_mask), _union(in_mask)
    xf = _masked_input(x, in_idx, in_count, in_mask, c, compact_input, in_union).to(acc)
    w = take_block(weight.to(acc), out_union[0], in_union[0])
    b = None if bias is None else (bias if out_union[0] is None else bias.index_select(0, out_union[0])).to(acc)
    yf = F.conv2d(xf, w, b, stride, padding, dilation)
    if compact_output:
        valid = _valid(out_idx, out_count)
        return _gather_channels(yf, _union_rows(out_idx, valid, out_union[1]), valid)
    return _widen(torch.where(_union_cols(out_mask, out_union[0])[:, :, None, None], yf, 0), out_union[0], o)


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
    workers: bool = True,
) -> torch.Tensor:
    """``y[n] = conv2d(x[n] * m_in[n], W, b) * m_out[n]``, computing only each sample's active filters on its read
    channels. Full-size (N, O, H', W') output in x's memory format, zero outside each sample's set; the compact
    forms of the module docstring with ``compact_input`` / ``compact_output``. ``workers``: the group loop may run
    on the worker threads (``_workers.map_parts``); False runs it on the calling thread with its intra-op threads,
    which the op layer asks for in a forward that autograd will not differentiate (``_workers.py`` has the
    measurements)."""
    n = x.shape[0]
    c = weight.shape[1]
    o, _, kh, kw = weight.shape
    ho, wo = out_hw(x, weight, stride, padding, dilation)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    width = out_idx.shape[1] if compact_output else o
    if n == 0:
        return torch.empty((n, width, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    # half precision runs each group's convolution in float32: the CPU kernels' half-precision paths for a batch of
    # one sample accumulated in low precision (dx off by 9% on a 63-term sum in bfloat16)
    acc = _accumulation_dtype(x.dtype)
    out_mask, in_mask = _masks(out_idx, out_count, n, o), _masks(in_idx, in_count, n, c)
    distinct = _distinct_sets(out_mask, in_mask)
    if _masked_pays(out_mask, in_mask, c, distinct[0].shape[0], kh * kw, x.shape[2] * x.shape[3], ho * wo):
        y = _masked_forward(x, weight, bias, out_idx, out_count, out_mask, in_idx, in_count, in_mask, stride,
                            padding, dilation, compact_input, compact_output, acc)
        return y.to(x.dtype).contiguous(memory_format=fmt)
    groups, costs = _groups(out_mask, in_mask, distinct)
    y = torch.empty((n, width, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if not compact_output:  # inactive channels lie anywhere: zero them all first; compact rows zero their own tails
        y.zero_()
    # one contiguous copy of the weight (channels_last in a model moved to channels_last), in the accumulation type
    # and with the zero filter and channel the groups' padded blocks gather, here, not one per group: AlexNet conv3's
    # 64 per-sample gathers from a channels_last weight cost 45 ms of copies that way
    weight_p = _padded_weight(weight.to(acc))
    bias_acc = None if bias is None else bias.to(acc)

    def run(part: list) -> None:  # each group writes only its own samples of y
        for samples, out_set, in_set in part:
            if compact_output:
                # the rows past the count are zero; so are those below it when nothing is read and there is no bias
                nothing = out_set.numel() == 0 or (in_set is not None and in_set.numel() == 0 and bias is None)
                _zero_tail(y, samples, 0 if nothing else out_set.numel())
            if out_set.numel() == 0:
                continue
            if in_set is not None and in_set.numel() == 0:  # nothing read: only the bias
                if bias is not None:
                    b = bias.index_select(0, out_set)
                    _put(y, samples, out_set, b[None, :, None, None].expand(len(samples), -1, ho, wo),
                         compact_output)
                continue
            xs = _take(x, samples, in_set, compact_input).to(acc)
            ys = _group_conv(xs, weight_p, bias_acc, out_set, in_set, stride, padding, dilation, ho * wo)
            _put(y, samples, out_set, ys.to(x.dtype), compact_output)

    if workers:
        map_parts(run, groups, costs)
    else:
        run(groups)
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
    groups: tuple[list, list[float]] | None = None
    if n and (need_x or need_w or need_b):
        out_mask, in_mask = _masks(out_idx, out_count, n, o), _masks(in_idx, in_count, n, c)
        distinct = _distinct_sets(out_mask, in_mask)
        ho, wo = grad_y.shape[2:]
        if _masked_pays(out_mask, in_mask, c, distinct[0].shape[0], weight.shape[2] * weight.shape[3],
                        x.shape[2] * x.shape[3], ho * wo):
            return _masked_backward(grad_y, x, weight, out_idx, out_count, out_mask, in_idx, in_count, in_mask,
                                    stride, padding, dilation, (need_x, need_w, need_b), compact_input,
                                    compact_output)
        groups = _groups(out_mask, in_mask, distinct)
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

    parts = map_parts(run, *groups) if groups is not None else [run([])]
    dw, db = parts[0]
    for dw_part, db_part in parts[1:]:
        if need_w:
            dw += dw_part
        if need_b:
            db += db_part
    return dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(weight.dtype)


def _masked_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out_idx: torch.Tensor,
    out_count: torch.Tensor | None, out_mask: torch.Tensor, in_idx: torch.Tensor | None,
    in_count: torch.Tensor | None, in_mask: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], needs: tuple[bool, bool, bool], compact_input: bool, compact_output: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of the masked form: one ``convolution_backward`` of the batch's union of filters on its union of
    read channels, with dy zero outside each sample's active filters and x zero outside its read channels, so dW and
    db sum exactly each sample's terms (and are zero outside the union)."""
    need_x, need_w, need_b = needs
    o, c = weight.shape[:2]
    acc = _accumulation_dtype(x.dtype)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out_union, in_union = _union(out_mask), _union(in_mask)
    sel_o = out_union[0]
    if compact_output:
        valid = _valid(out_idx, out_count)
        g = _scatter_channels(grad_y, _union_rows(out_idx, valid, out_union[1]), valid,
                              o if sel_o is None else sel_o.numel())
    else:
        g = torch.where(_union_cols(out_mask, sel_o)[:, :, None, None],
                        grad_y if sel_o is None else grad_y.index_select(1, sel_o), 0)
    g = g.to(acc).contiguous(memory_format=fmt)
    dx = dw = None
    if need_x or need_w:
        xf = _masked_input(x, in_idx, in_count, in_mask, c, compact_input, in_union).to(acc)
        w = take_block(weight.contiguous().to(acc), sel_o, in_union[0])
        dxf, dw_u, _ = torch.ops.aten.convolution_backward(
            g, xf.contiguous(memory_format=fmt), w, None, list(stride), list(padding), list(dilation), False,
            [0, 0], 1, [need_x, need_w, False],
        )
        if need_w:
            if sel_o is None and in_union[0] is None:
                dw = dw_u
            else:
                rows = sel_o if sel_o is not None else torch.arange(o, device=weight.device)
                dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
                add_block(dw, rows, in_union[0], dw_u)
        if need_x:
            if compact_input:
                valid = _valid(in_idx, in_count)
                dxf = _gather_channels(dxf, _union_rows(in_idx, valid, in_union[1]), valid)
            elif in_mask is not None:
                dxf = _widen(torch.where(_union_cols(in_mask, in_union[0])[:, :, None, None], dxf, 0), in_union[0], c)
            dx = dxf.to(x.dtype).contiguous(memory_format=fmt)
    db = _widen(g.sum((0, 2, 3))[None], sel_o, o)[0].to(weight.dtype) if need_b else None
    return dx, None if dw is None else dw.to(weight.dtype), db
