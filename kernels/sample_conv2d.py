"""Convolution with one active filter set PER SAMPLE (issue #15): the launchers of ``active_conv2d``'s three
Triton kernels (forward, dX, dW) in their ``PER_SAMPLE`` mode.

Feeney (2019), shared/papers/001, Alg. 4-5 with the active set chosen per input: sample ``n`` computes only the
filters ``A_n``, the first ``out_count[n]`` entries of row ``n`` of ``out_idx`` (N, O) (sorted; the rest of the row
is padding, never used). With ``m[n, o]`` the 0/1 mask of ``A_n``, every launcher here equals

    y[n]  = conv2d(x[n], W, b) * m[n]
    dx[n] = conv_transpose2d(dy[n] * m[n], W)
    dW[o] = sum_{n: o in A_n} sum_{oh, ow} dy[n, o, oh, ow] * x[n, :, oh*s - p + r*d, ow*s - p + t*d]
    db[o] = sum_{n: o in A_n} sum_{oh, ow} dy[n, o, oh, ow]

Input channels are the caller's business (the op layer multiplies x and dx by a per-sample channel mask): these
launches read every input channel.

Every tile of work lies inside one sample (a tile of output / input positions never crosses an image; the dW
programs reduce over one sample's positions), so a program reads its sample's count and index row once, and the
counts stay on the device (no host sync):

* forward:  per sample, (H'*W' positions) x (the sample's filters, gathered rows of W), reduction over (taps x
            channels); filter tiles at or past the sample's count exit at once (y is allocated zeroed);
* dX:       per sample, (H*W input positions) x (channels), reduction over (taps x the sample's filters): dy arrives
            compacted per sample by one ``torch.gather`` (``gk[n, p, j] = dy[n, p, out_idx[n, j]]``, NHWC), so the
            A operand is contiguous, and the loop stops at the sample's own count; the B operand gathers W rows
            ``out_idx[n, j]``, whose channels are contiguous (vector loads);
* dW:       one program per (filter tile, channel tile, tap) and sample reduces over the sample's H'*W' positions
            and adds its tile into rows ``out_idx[n, j]`` of an fp32 buffer with fp32 atomics (samples meet there
            like the split-K slices of the per-batch dW). Rows past a sample's count never accumulate: a filter
            inactive in every sample stays exactly zero. db is a torch sum of dy under the samples' masks.

The same kernels as the per-batch path, so the same layouts and small-C paths: fewer than 16 input channels (AlexNet's
conv1) take the ROWS reduction over a kernel row's kw * C_PAD contiguous elements in the forward and dW, and dX reads
W with its channels zero-padded to 16 (``active_conv2d``'s module docstring).
"""

from __future__ import annotations

import torch
import triton

from ._common import (
    activations_channels_last,
    channels_inner,
    conv_out_hw,
    dot_precision,
    empty_like_format,
    is_channels_last,
    take_channels,
)
from .active_conv2d import (
    DX_FILTER_ALIGN,
    ROWS_MAX_CHANNELS,
    _active_conv2d_bwd_dw_kernel,
    _active_conv2d_bwd_dx_kernel,
    _active_conv2d_fwd_kernel,
    _geometry,
    _padded_frame,
    _position_rows,
    _rows_frame,
    _rows_weight,
    dx_phases,
    rows_channels,
    rows_mode,
)


def _check_sets(name: str, x: torch.Tensor, o: int, out_idx: torch.Tensor, out_count: torch.Tensor) -> None:
    n = x.shape[0]
    if not isinstance(out_idx, torch.Tensor) or out_idx.dtype != torch.int64 or tuple(out_idx.shape) != (n, o):
        raise TypeError(f"{name}: out_idx must be an (N, O) = ({n}, {o}) int64 tensor, got "
                        f"{getattr(out_idx, 'dtype', type(out_idx))} {tuple(getattr(out_idx, 'shape', ()))}")
    if not isinstance(out_count, torch.Tensor) or out_count.dtype != torch.int64 or tuple(out_count.shape) != (n,):
        raise TypeError(f"{name}: out_count must be an (N,) = ({n},) int64 tensor, got "
                        f"{getattr(out_count, 'dtype', type(out_count))} {tuple(getattr(out_count, 'shape', ()))}")
    for what, t in (("out_idx", out_idx), ("out_count", out_count)):
        if t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device} but x is on {x.device}")


def _index_rows(out_idx: torch.Tensor, width: int) -> torch.Tensor:
    """out_idx as int32 (N, width) rows, padded with filter 0 past O (padding: never used past the count)."""
    n, o = out_idx.shape
    idx = torch.zeros((n, width), dtype=torch.int32, device=out_idx.device)
    idx[:, :o] = out_idx
    return idx


def _sample_mask(out_idx: torch.Tensor, out_count: torch.Tensor, o: int) -> torch.Tensor:
    """(N, O) fp32 0/1 mask of each sample's active filters, on the device (the padding of a row may repeat an
    active filter: it adds 0, and the clamp keeps a repeated active one at 1)."""
    n = out_idx.shape[0]
    valid = (torch.arange(o, device=out_idx.device)[None, :] < out_count[:, None]).float()
    return torch.zeros((n, o), dtype=torch.float32, device=out_idx.device).scatter_add_(1, out_idx, valid).clamp_(
        max=1.0)


def sample_conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_idx: torch.Tensor,
    out_count: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``y[n] = conv2d(x[n], weight, bias) * m[n]``, m[n] the 0/1 mask of sample n's active filters
    ``out_idx[n, :out_count[n]]`` (out_idx (N, O) int64, out_count (N,) int64, both on x's device; counts are read
    by the kernel, never on the host). Full-size (N, O, H', W') result in x's memory format, zero outside each
    sample's set."""
    name = "tritonslide.kernels.sample_conv2d_forward"
    n, c, h, w = x.shape
    o = weight.shape[0]
    _check_sets(name, x, o, out_idx, out_count)
    kh, kw = weight.shape[-2:]
    ho, wo = conv_out_hw(h, w, kh, kw, stride, padding, dilation)
    y = empty_like_format(x, (n, o, ho, wo), zero=True)  # filters outside a sample's set are never written
    if n == 0 or o == 0 or ho * wo == 0:
        return y
    if c == 0:  # no input channel: only the bias of each sample's active filters remains
        if bias is not None:
            y += (bias.float()[None, :] * _sample_mask(out_idx, out_count, o)).to(y.dtype)[:, :, None, None]
        return y
    rows = rows_mode(c, dilation)
    c_pad = rows_channels(c) if rows else 1
    if rows:
        # few channels: the zero-padded frame and W as (O, kh kw C_PAD) rows (active_conv2d's ROWS order)
        xk = _rows_frame(x, None, padding, c_pad)
        wk = _rows_weight(weight, None, c_pad)
        sx, sw = (xk.stride(0), xk.stride(1), xk.stride(2)), (wk.stride(0), 0, 0)
    else:
        xk = activations_channels_last(x)
        wk = channels_inner(weight)
        sx, sw = (xk.stride(0), xk.stride(2), xk.stride(3)), (wk.stride(0), wk.stride(2), wk.stride(3))
    idx = out_idx.to(torch.int32).contiguous()
    count = out_count.contiguous()
    grid = lambda meta: (n * triton.cdiv(ho * wo, meta["BLOCK_M"]) * triton.cdiv(o, meta["BLOCK_N"]),)  # noqa: E731
    _active_conv2d_fwd_kernel[grid](
        xk, wk, bias if bias is not None else wk, y, idx, count,
        n * ho * wo, o, c, h, w, ho, wo,
        *sx, *sw, *y.stride(), idx.stride(0),
        **_geometry(weight, stride, padding, dilation),
        HAS_BIAS=bias is not None, HAS_OUT_IDX=True, COMPACT_OUT=False, HAS_COUNT=True,
        Y_CHANNELS_LAST=is_channels_last(y), PRECISION=dot_precision(x.dtype), ROWS=rows, C_PAD=c_pad,
        PER_SAMPLE=True,
    )
    return y


def sample_conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    out_idx: torch.Tensor,
    out_count: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx, dW, db)`` of :func:`sample_conv2d_forward` (``needs`` = (need_x, need_w, need_b); None where
    not needed): dx in x's memory format, dW / db in the weight's dtype, zero in the rows inactive in every sample."""
    name = "tritonslide.kernels.sample_conv2d_backward"
    need_x, need_w, need_b = needs[0], needs[1], needs[2] and has_bias
    n, c, h, w = x.shape
    o = weight.shape[0]
    _check_sets(name, x, o, out_idx, out_count)
    kh, kw = weight.shape[-2:]
    ho, wo = grad_y.shape[2], grad_y.shape[3]
    if weight.numel() >= 2**31:  # the dX kernel's W row offsets are int32
        raise ValueError(f"{name}: weights of {weight.numel()} elements exceed the kernel's int32 offsets")
    if grad_y.dtype != x.dtype:  # tl.dot needs both operands in one dtype
        grad_y = grad_y.to(x.dtype)
    empty = n == 0 or o == 0 or c == 0 or ho * wo == 0
    geometry = _geometry(weight, stride, padding, dilation)
    prec = dot_precision(x.dtype)
    count = out_count.clamp(0, o)  # (on the device) the kernels clamp to gk's padded width, not to O
    dx = dw = db = None
    if not empty and (need_x or need_w):
        # dy compacted per sample, NHWC: gk[n, p, j] = dy[n, out_idx[n, j], p] (one gather, padded to a multiple of
        # 64 columns)
        r_cols = triton.cdiv(o, DX_FILTER_ALIGN) * DX_FILTER_ALIGN
        in_use = torch.arange(r_cols, device=out_idx.device)[None, :] < count[:, None]  # (N, R), on the device
        # entries past a sample's count point at filter 0 (whatever the caller's padding holds: dX gathers W rows
        # with them unmasked), and gk's columns there are zero (a select, not a product: a non-finite dy of a filter
        # the sample does not use must not reach it), so that those rows add nothing
        idx = torch.where(in_use, _index_rows(out_idx, r_cols), 0).to(torch.int32)
        gk = torch.gather(grad_y.permute(0, 2, 3, 1), 3, idx.long().view(n, 1, 1, r_cols).expand(n, ho, wo, r_cols))
        gk = torch.where(in_use.view(n, 1, 1, r_cols), gk, 0).contiguous()

    if need_x:
        dx = empty_like_format(x, x.shape, zero=empty)
        if not empty:
            c_ld = 0
            if c < ROWS_MAX_CHANNELS:
                # few channels: W's channel axis zero-padded to 16 (vector loads of the dot's N side)
                c_ld = triton.cdiv(c, 16) * 16
                wk = take_channels(weight, None, c_ld)
            else:
                wk = channels_inner(weight)
            per_image, phases, taps = dx_phases(h, w, stride, dilation)

            def grid(meta):
                return (n * triton.cdiv(per_image, meta["BLOCK_M"]) * phases * triton.cdiv(c, meta["BLOCK_N"]),)

            _active_conv2d_bwd_dx_kernel[grid](
                gk, wk, dx, wk, count, idx,
                n * per_image, c, r_cols, h, w, ho, wo,
                gk.stride(0), gk.stride(1), gk.stride(2), wk.stride(0), wk.stride(2), wk.stride(3), *dx.stride(),
                idx.stride(0), **geometry, SCATTER_IN=False, HAS_COUNT=True, DX_CHANNELS_LAST=is_channels_last(dx),
                PRECISION=prec, C_LD=c_ld, PER_SAMPLE=True, **taps,
            )

    if need_w:
        # an fp32 buffer: samples meet through fp32 atomics (the interpreter has no fp16 atomic_add); the config's
        # pre_hook zeroes it before every launch (autotuning included)
        dw32 = (torch.zeros if empty else torch.empty)(weight.shape, dtype=torch.float32, device=weight.device)
        if not empty:
            rows_dw = rows_mode(c, dilation)
            c_pad = rows_channels(c) if rows_dw else 1
            if rows_dw:
                # ROWS: a program's columns are a kernel row's kw * C_PAD elements; the frame's zero image (after
                # the N) is what the table entries past a sample's positions read
                frame = _rows_frame(x, None, padding, c_pad, zero_image=True)
                taps, n_extent, zero_row = kh, kw * c_pad, n * frame.shape[1] * frame.shape[2]
            else:
                frame = _padded_frame(x, padding)
                taps, n_extent, zero_row = kh * kw, c, 0
            rows = _position_rows(n, ho, wo, frame.shape[1], frame.shape[2], frame.numel() >= 2**31, tuple(stride),
                                  x.device)

            def grid(meta):
                return (triton.cdiv(r_cols, meta["BLOCK_M"]) * taps * triton.cdiv(n_extent, meta["BLOCK_N"]), n)

            _active_conv2d_bwd_dw_kernel[grid](
                gk, frame, rows, dw32, idx, idx, count,
                ho * wo, r_cols, c, frame.shape[2], r_cols, frame.shape[3], *dw32.stride(), idx.stride(0), zero_row,
                KH=kh, KW=kw, DH=dilation[0], DW=dilation[1], HAS_OUT_IDX=True, HAS_IN_IDX=False,
                HAS_COUNT=True, PRECISION=prec, ROWS=rows_dw, C_PAD=c_pad, PER_SAMPLE=True,
            )
        dw = dw32.to(weight.dtype)

    if need_b:
        # a torch sum of dy over each sample's active filters, outside the dW loop (active_conv2d's dW docstring)
        per_sample = grad_y.sum((2, 3), dtype=torch.float32)  # (N, O)
        db = (per_sample * _sample_mask(out_idx, out_count, o)).sum(0).to(weight.dtype)
    return dx, dw, db
