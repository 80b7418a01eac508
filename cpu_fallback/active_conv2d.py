"""Active-filter convolution in PyTorch: only the rows ``out_idx`` of the weight, reading only ``in_idx``.

Feeney (2019), shared/papers/001, Alg. 4-6: the active set ``A`` of filters is gathered, the convolution runs on
it alone and the output is scattered back into a zero tensor of the full channel count; the backward pass uses
``A`` for ``dI`` and updates only the rows of ``A`` (Alg. 5). With last-active-set sharing (Alg. 6) only the input
channels ``in_idx`` are read.

Definition (with masks ``m_out``, ``m_in`` that are 1 on the indexed channels):
    ``y = (conv2d(x * m_in, W, b)) * m_out``,  ``dW = m_out * (dW of that) * m_in``,  ``dx = m_in * (...)``.

Compact forms (Alg. 6 passes the active channels alone, ``I in R^{N x c' x h x w}``): with ``compact_input`` x
holds only the channels ``in_idx`` (in that order) and dx comes back the same way; with ``compact_output`` y holds
only the rows ``out_idx``. The values are those of the definition without the zero channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._format import out_hw, zeros_like_format
from ._gather import take_block


def _gather(x, weight, bias, out_idx, in_idx, compact_input=False):
    xs = x if in_idx is None or compact_input else x.index_select(1, in_idx)
    w = take_block(weight, out_idx, in_idx)
    b = None if bias is None else (bias if out_idx is None else bias.index_select(0, out_idx))
    return xs, w, b


def torch_active_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    in_idx: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    compact_input: bool = False,
    compact_output: bool = False,
) -> torch.Tensor:
    """``conv2d(x * m_in, weight, bias) * m_out`` computed on the active rows and channels only."""
    n, o = x.shape[0], weight.shape[0]
    ho, wo = out_hw(x, weight, stride, padding, dilation)
    xs, w, b = _gather(x, weight, bias, out_idx, in_idx, compact_input)
    if compact_output:
        o = w.shape[0]
    if w.shape[0] == 0 or n == 0:
        return zeros_like_format(x, n, o, ho, wo)
    if w.shape[1] == 0:  # no active input channel: only the bias of the active rows remains
        y_act = zeros_like_format(x, n, w.shape[0], ho, wo)
        if b is not None:
            y_act += b.view(1, -1, 1, 1)
    else:
        y_act = F.conv2d(xs, w, b, stride, padding, dilation)
    if compact_output or out_idx is None or out_idx.numel() == o:
        # out_idx is sorted and unique (checked by the op layer), so a full set is the identity permutation.
        return y_act
    # Zero-fill + index_copy_ stays: on AlexNet's ALSH layers (batch 64, 2 threads) it beat the one-pass
    # alternatives. A gather from [y_act, zero channel] (cat + index_select) took 24-25 ms vs 13-16 ms on conv2's
    # (64, 192, 27, 27) output and 0.8-1.1 ms vs 0.4-0.6 ms on the 13x13 layers; empty + index_copy_ +
    # index_fill_ of the inactive channels lost at 1 thread as well (19.4 vs 17.0 ms, 1.7 vs 0.6 ms). A
    # channels_last conv (5-23% faster at 1 thread) pays that back in the transposing scatter into this NCHW
    # output (conv2: +6 ms). Most of the cost on the large layers is first-touch page faults of the fresh output
    # (8.7k pages, ~15 of the 17 ms on conv2), which the dense convolution pays for its output as well.
    y = zeros_like_format(x, n, o, ho, wo)
    return y.index_copy_(1, out_idx, y_act)


def torch_active_conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    out_idx: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs: tuple[bool, bool, bool],
    compact_input: bool = False,
    compact_output: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dW, db) of :func:`torch_active_conv2d`; zero outside the active rows and channels."""
    need_x, need_w, need_b = needs[0], needs[1], needs[2] and has_bias
    xs, w, _ = _gather(x, weight, None, out_idx, in_idx, compact_input)
    full = out_idx is None or out_idx.numel() == weight.shape[0]
    g = grad_y if compact_output or full else grad_y.index_select(1, out_idx)
    dx = dw = db = None
    if w.shape[0] == 0 or w.shape[1] == 0 or x.shape[0] == 0:
        dxs = xs.new_zeros(xs.shape) if need_x else None
        dws = w.new_zeros(w.shape) if need_w else None
        dbs = g.sum((0, 2, 3)) if need_b else None
    else:
        dxs, dws, dbs = torch.ops.aten.convolution_backward(
            g.contiguous(),
            xs,
            w,
            [w.shape[0]] if need_b else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            1,
            [need_x, need_w, need_b],
        )
    if need_x:
        dx = dxs if in_idx is None or compact_input else x.new_zeros(x.shape).index_copy_(1, in_idx, dxs)
    if need_w:
        if in_idx is not None:
            dws = dws.new_zeros(dws.shape[0], weight.shape[1], *weight.shape[2:]).index_copy_(1, in_idx, dws)
        dw = dws if out_idx is None else weight.new_zeros(weight.shape).index_copy_(0, out_idx, dws)
    if need_b:
        db = dbs if out_idx is None else weight.new_zeros(weight.shape[0]).index_copy_(0, out_idx, dbs)
    return dx, dw, db
