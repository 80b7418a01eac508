"""Convolution with one active filter set PER SAMPLE, as Triton implicit-im2col GEMMs (forward, dX, dW with fused db).

Feeney (2019), shared/papers/001, Alg. 4-5 with the active set chosen per input (issue #15): sample ``n`` computes
only the filters ``A_n``, the first ``out_count[n]`` entries of row ``n`` of ``out_idx`` (N, O) (sorted; the rest
of the row is padding, never used). With ``m[n, o]`` the 0/1 mask of ``A_n``, every launcher here equals

    y[n]  = conv2d(x[n], W, b) * m[n]
    dx[n] = conv_transpose2d(dy[n] * m[n], W)
    dW[o] = sum_{n: o in A_n} sum_{oh, ow} dy[n, o, oh, ow] * x[n, :, oh*s - p + r*d, ow*s - p + t*d]
    db[o] = sum_{n: o in A_n} sum_{oh, ow} dy[n, o, oh, ow]

Input channels are the caller's business (the op layer multiplies x and dx by a per-sample channel mask): these
kernels read every input channel.

Every tile of work lies inside one sample (a tile of output / input positions never crosses an image; the dW
programs reduce over one sample's positions), so a program reads its sample's count and index row once, and the
counts stay on the device (no host sync):

* forward:  per sample, (H'*W' positions) x (the sample's filters, gathered rows of W), reduction over (taps x
            channels); filter tiles at or past the sample's count exit at once (y is allocated zeroed);
* dX:       per sample, (H*W input positions) x (channels), reduction over (taps x the sample's filters): dy arrives
            compacted per sample by one ``torch.gather`` (``gk[n, p, j] = dy[n, p, out_idx[n, j]]``, NHWC), so the
            A operand is contiguous, and the loop stops at the sample's own count; the B operand gathers W rows
            ``out_idx[n, j]``, whose channels are contiguous (vector loads);
* dW:       one program per (sample, filter tile, channel tile, tap) reduces over the sample's H'*W' positions and
            adds its tile into rows ``out_idx[n, j]`` of an fp32 buffer with fp32 atomics (samples meet there like the
            split-K slices of ``active_conv2d``'s dW). It reads x as the same zero-padded NHWC frame with a
            per-position row table (``active_conv2d._padded_frame`` / ``_position_rows``). Rows past a sample's
            count never accumulate: a filter inactive in every sample stays exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import tuned
from ._common import (
    activations_channels_last,
    channels_inner,
    conv_out_hw,
    dot_precision,
    empty_like_format,
    is_channels_last,
)
from ._gemm import clamp_blocks, config_factory, dot_configs, inside, next_step, store_tile
from .active_conv2d import _configs, _geometry, _padded_frame, _position_rows, _zero_dw_db

# ----------------------------------------------------------------------------------------------------------------
# Autotune lists: tiles of active_conv2d's lists (the same GEMM shapes: one sample's positions x filters or
# channels), every tile with >= 64 rows (the smallest wgmma). Last field: fits fp32 with IEEE products (FMA dots keep
# both operands and the accumulator in registers). Every config compiles without spills for sm_80 / sm_90 in the
# dtypes it serves (bench.aot, kernels sample_*). Dropped for spilling: the forward's 128-wide filter tiles
# (128x128x32 / 8 warps: 424 B on sm_80, 192 B on sm_90; 64x128x32 / 4 warps: 400 / 272 B, fp16; a gathered W tile
# of 128 rows keeps a 64-bit row pointer per row) and dW's 64x128x32 / 4 warps (56 B on sm_80, fp16); kept off IEEE
# fp32 for spilling there: the forward's 128x64x32 / 8 warps (16 B), 64x64x32 / 4 warps (80 B on sm_80) and
# 128x32x32 / 4 warps (88 B on sm_80). Not timed on a GPU: untuned.
# ----------------------------------------------------------------------------------------------------------------
_FWD_TILES = [
    (128, 64, 32, 8, 3, False),
    (128, 64, 64, 8, 3, False),
    (64, 64, 32, 4, 4, False),
    (128, 32, 32, 4, 4, False),
    (64, 32, 32, 4, 3, False),
    (64, 32, 16, 4, 3, True),
]
_DX_TILES = [
    (128, 128, 32, 8, 3, False),
    (128, 64, 32, 8, 3, False),
    (64, 64, 32, 4, 4, False),
    (64, 32, 32, 4, 3, True),
    (64, 32, 16, 4, 3, True),
]
# dW: (filters x channels) tiles of one tap and one sample, reduction over that sample's positions (BLOCK_K of them
# per step).
_DW_TILES = [
    (64, 64, 32, 4, 3, True),
    (128, 64, 32, 8, 3, True),
    (64, 64, 64, 4, 3, False),
    (64, 32, 32, 4, 3, True),
]
# The interpreter runs one program at a time in numpy: few large programs are fastest there.
_INTERP_TILE = (64, 16, 16, 4, 1, True)
_INTERP_DW_TILE = (16, 16, 64, 4, 1, True)

_tile = config_factory("BLOCK_M", "BLOCK_N", "BLOCK_K")
_dw_tile = config_factory("BLOCK_M", "BLOCK_N", "BLOCK_K", pre_hook=_zero_dw_db)

_FWD_CONFIGS, _FWD_GPU, _FWD_FMA = _configs(_FWD_TILES, _INTERP_TILE, _tile)
_DX_CONFIGS, _DX_GPU, _DX_FMA = _configs(_DX_TILES, _INTERP_TILE, _tile)
_DW_CONFIGS, _DW_GPU, _DW_FMA = _configs(_DW_TILES, _INTERP_DW_TILE, _dw_tile)


def _rows_fit(configs, positions):
    """Drop 128-row position tiles when a sample has at most 64 positions (a tile never crosses a sample: the extra
    rows would all be masked); 64 rows stay (the smallest wgmma)."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(positions))]
    return kept or configs


def _prune_fwd(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}
    use = dot_configs(configs, a, "x_ptr", _FWD_GPU, _FWD_FMA) or configs
    return clamp_blocks(_rows_fit(use, a["HO"] * a["WO"]), a["N_OUT"], a["C"])


def _prune_dx(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}
    use = dot_configs(configs, a, "g_ptr", _DX_GPU, _DX_FMA) or configs
    return clamp_blocks(_rows_fit(use, a["H"] * a["W"]), a["C"], a["R"])


def _prune_dw(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}
    use = dot_configs(configs, a, "g_ptr", _DW_GPU, _DW_FMA) or configs
    # rows are filters here (BLOCK_M): clamp them as the "K" extent, channels as BLOCK_N
    return clamp_blocks(use, a["C"], a["R"], n_name="BLOCK_N", k_name="BLOCK_M")


# autotune key: the conv geometry and the dot precision (TF32 and IEEE fp32 are different kernels)
_GEOMETRY = ["KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "PRECISION"]


@triton.jit
def _sample_count(count_ptr, nb, limit):
    """``out_count[nb]`` clamped to [0, limit]."""
    return tl.minimum(tl.maximum(tl.load(count_ptr + nb).to(tl.int32), 0), limit)


@tuned(
    configs=_FWD_CONFIGS,
    key=["NB", "N_OUT", "C", "H", "W", "HO", "WO", "Y_CHANNELS_LAST"] + _GEOMETRY,
    prune_configs_by={"early_config_prune": _prune_fwd},
    buckets=["NB", "N_OUT", "C"],
)
@triton.jit
def _sample_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, out_idx_ptr, count_ptr,
    NB, N_OUT, C, H, W, HO, WO,
    sxn, sxh, sxw, swo, swh, sww, syn, syc, syh, syw, sio,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, Y_CHANNELS_LAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y[n, A_nj, oh, ow] = b[A_nj] + sum_{r, t, c} x[n, oh*s-p+r*d, ow*s-p+t*d, c] * W[A_nj, r, t, c]`` for the
    active filters ``A_n = out_idx[n, :out_count[n]]`` of sample n (x NHWC, W (O, kh, kw, C)).

    One program: BLOCK_M output positions of ONE sample x BLOCK_N of its active filters; one flat loop over (tap,
    BLOCK_K channel chunk), as ``_active_conv2d_fwd_kernel``."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    tiles_hw = tl.cdiv(HO * WO, BLOCK_M)
    # filter blocks vary fastest: the programs that run together share the same input tile
    pid_n = pid % num_n
    t = pid // num_n
    pid_p = t % tiles_hw
    nb = t // tiles_hw
    count = _sample_count(count_ptr, nb, N_OUT)
    if pid_n * BLOCK_N >= count:  # past this sample's active set: its outputs stay zero
        return

    sp = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = sp < HO * WO
    oh = sp // WO
    ow = sp - oh * WO
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    nb64 = nb.to(tl.int64)  # a batch of large images passes 2**31 elements
    x_pos = x_ptr + nb64 * sxn + ih0 * sxh + iw0 * sxw

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < count
    o_w = tl.load(out_idx_ptr + nb64 * sio + offs_n, mask=n_mask, other=0)
    w_rows = w_ptr + o_w.to(tl.int64) * swo
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_cc = tl.cdiv(C, BLOCK_K)
    r = 0
    s = 0
    c0 = 0
    for kk in range(0, KH * KW * num_cc):
        ih = ih0 + r * DH
        iw = iw0 + s * DW
        valid = m_mask & inside(ih, H) & inside(iw, W)  # zero padding
        k_mask = offs_k < C - c0
        a = tl.load((x_pos + (r * DH * sxh + s * DW * sxw + c0))[:, None] + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load((w_rows + (r * swh + s * sww + c0))[None, :] + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        r, s, c0 = next_step(r, s, c0, C, KW, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(b_ptr + o_w, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + nb64 * syn + oh * syh + ow * syw
    store_tile(y_rows, o_w * syc, acc.to(y_ptr.dtype.element_ty), m_mask, n_mask, not Y_CHANNELS_LAST)


@tuned(
    configs=_DX_CONFIGS,
    key=["NB", "C", "R", "H", "W", "HO", "WO", "DX_CHANNELS_LAST"] + _GEOMETRY,
    prune_configs_by={"early_config_prune": _prune_dx},
    buckets=["NB", "C", "R"],
)
@triton.jit
def _sample_conv2d_bwd_dx_kernel(
    g_ptr, w_ptr, dx_ptr, out_idx_ptr, count_ptr,
    NB, C, R, H, W, HO, WO,
    sgn, sgh, sgw, swo, swh, sww, sdn, sdc, sdh, sdw, sio,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    DX_CHANNELS_LAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dI through each sample's active filters only, the transposed convolution

    ``dx[n, ih, iw, c] = sum_{r, t, j < count[n]} gk[n, (ih+p-r*d)/s, (iw+p-t*d)/s, j] * W[out_idx[n, j], r, t, c]``

    where a term exists only when both quotients are exact and inside the output; ``gk`` is dy compacted per sample
    (NHWC, R >= O columns: column j holds filter ``out_idx[n, j]``). One program: BLOCK_M input positions of ONE
    sample x BLOCK_N channels; one flat loop over (tap, BLOCK_K chunk of the sample's filters)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(C, BLOCK_N)
    tiles_hw = tl.cdiv(H * W, BLOCK_M)
    pid_n = pid % num_n
    t = pid // num_n
    pid_p = t % tiles_hw
    nb = t // tiles_hw
    count = _sample_count(count_ptr, nb, R)
    nb64 = nb.to(tl.int64)

    sp = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = sp < H * W
    ih = sp // W
    iw = sp - ih * W
    g_img = g_ptr + nb64 * sgn
    th0 = ih + PH
    tw0 = iw + PW
    g_pos = g_img + th0 * sgh + tw0 * sgw  # stride 1: the dy row of tap (r, s) is a fixed offset from it

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_n < C
    w_cols = w_ptr + offs_n
    idx_row = out_idx_ptr + nb64 * sio
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # a sample with an empty set runs no step (its dx tile is stored as zeros)
    num_kc = tl.cdiv(count, BLOCK_K)
    r = 0
    s = 0
    k0 = 0
    for kk in range(0, KH * KW * num_kc):
        th = th0 - r * DH
        tw = tw0 - s * DW
        # gk is read up to its allocated R columns (a multiple of 16: the mask is constant over a 16-byte vector);
        # the filters past the count are cut by W's mask, along W's rows, which does not split vectors
        a_mask = offs_k < R - k0
        k_mask = offs_k < count - k0
        if SH * SW == 1:
            valid = m_mask & inside(th, HO) & inside(tw, WO)
            g_rows = g_pos - (r * DH * sgh + s * DW * sgw)
        else:
            oh = th // SH
            ow = tw // SW
            # th < 0 is masked first, so C-style truncating division of negatives never matters
            valid = m_mask & (th >= 0) & (tw >= 0) & (oh < HO) & (ow < WO)
            if SH > 1:
                valid = valid & ((th % SH) == 0)
            if SW > 1:
                valid = valid & ((tw % SW) == 0)
            g_rows = g_img + oh * sgh + ow * sgw
        a = tl.load((g_rows + k0)[:, None] + offs_k[None, :], mask=valid[:, None] & a_mask[None, :], other=0.0)
        # W rows of this chunk's filters (int32 offsets: the launcher checks W has < 2**31 elements)
        o_k = tl.load(idx_row + k0 + offs_k, mask=k_mask, other=0)
        b = tl.load(w_cols[None, :] + (o_k * swo + (r * swh + s * sww))[:, None],
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        r, s, k0 = next_step(r, s, k0, count, KW, BLOCK_K)

    dx_rows = dx_ptr + nb64 * sdn + ih * sdh + iw * sdw
    store_tile(dx_rows, offs_n * sdc, acc.to(dx_ptr.dtype.element_ty), m_mask, c_mask, not DX_CHANNELS_LAST)


@tuned(
    configs=_DW_CONFIGS,
    key=["NB", "HW", "R", "C", "KH", "KW", "DH", "DW", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_dw},
    buckets=["NB", "HW", "R", "C"],
)
@triton.jit
def _sample_conv2d_bwd_dw_kernel(
    g_ptr, x_ptr, rows_ptr, dw_ptr, db_ptr, out_idx_ptr, count_ptr,
    NB, HW, R, C, WP, sg, sx, sio, sdo, sdc, sdh, sdw,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The update of each sample's active rows:

    ``dW[A_nj, c, r, t] += sum_{oh, ow} gk[n, oh, ow, j] * x[n, oh*s-p+r*d, ow*s-p+t*d, c]`` and
    ``db[A_nj] += sum_{oh, ow} gk[n, oh, ow, j]`` for j < count[n], with gk the dense (N*H'*W', R) matrix of dy
    compacted per sample (row stride ``sg``) and x the zero-padded NHWC frame (row stride ``sx``) whose row for
    tap (0, 0) of position m is ``rows_ptr[m]`` (``_position_rows``; tap (r, t) is ``r d WP + t d`` further).

    One program: BLOCK_M of sample n's active filters x BLOCK_N channels of one tap, over all H'*W' positions of
    sample n (program_id(1)); samples meet through fp32 atomics in ``dw_ptr`` (full (O, C, kh, kw) layout) and
    ``db_ptr``, zeroed by the config's pre_hook."""
    pid = tl.program_id(0)
    nb = tl.program_id(1)
    num_m = tl.cdiv(R, BLOCK_M)
    num_cb = tl.cdiv(C, BLOCK_N)
    pid_m = pid % num_m  # row blocks vary fastest: they share the x tile of this (tap, channel block)
    pid_tc = pid // num_m
    tap = pid_tc // num_cb
    cb = pid_tc % num_cb
    r = tap // KW
    s = tap % KW
    count = _sample_count(count_ptr, nb, R)
    if pid_m * BLOCK_M >= count:
        return
    nb64 = nb.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count  # rows stored
    m_read = offs_m < R  # rows read: gk's allocated columns (a constant mask over a 16-byte vector)
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_n < C
    tap_row = r * DH * WP + s * DW  # frame rows from tap (0, 0) to tap (r, s)
    row_tab = rows_ptr + nb64 * HW

    offs_k = tl.arange(0, BLOCK_K)
    # dy^T tile (filters x positions), loaded position-major: the filters are gk's contiguous axis
    g_ptrs = g_ptr + nb64 * HW * sg + (offs_k[:, None] * sg + offs_m[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # db on the tensor cores, as in _active_conv2d_bwd_dw_kernel: dy^T times a (BLOCK_K, 16) tile of ones in column 0
    first_col = (offs_k[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0)
    ones = first_col.to(g_ptr.dtype.element_ty)
    db_acc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for k0 in range(0, HW, BLOCK_K):
        k_mask = offs_k < HW - k0
        a = tl.trans(tl.load(g_ptrs, mask=k_mask[:, None] & m_read[None, :], other=0.0))
        rows = tl.load(row_tab + k0 + offs_k, mask=k_mask, other=0) + tap_row
        b = tl.load(x_ptr + (rows * sx)[:, None] + offs_n[None, :], mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            if pid_tc == 0:  # db once per (sample, row block): only the programs of tap 0 / channel block 0 sum dy
                db_acc = tl.dot(a, ones, db_acc, input_precision=PRECISION)
        g_ptrs += BLOCK_K * sg

    o_w = tl.load(out_idx_ptr + nb64 * sio + offs_m, mask=m_mask, other=0)
    dw_ptrs = dw_ptr + (o_w * sdo)[:, None] + (offs_n * sdc)[None, :] + r * sdh + s * sdw
    tl.atomic_add(dw_ptrs, acc, mask=m_mask[:, None] & c_mask[None, :])
    if HAS_BIAS:
        if pid_tc == 0:
            tl.atomic_add(db_ptr + o_w, tl.sum(db_acc, axis=1), mask=m_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# gk's columns (and the int32 index rows) are padded to a multiple of this: 16 elements keep the dX / dW masks along
# gk's contiguous axis constant over a 16-byte vector, and every row of gk 16-byte aligned.
_COL_ALIGN = 16


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
    xk = activations_channels_last(x)
    wk = channels_inner(weight)
    idx = out_idx.to(torch.int32).contiguous()
    count = out_count.contiguous()
    grid = lambda meta: (n * triton.cdiv(ho * wo, meta["BLOCK_M"]) * triton.cdiv(o, meta["BLOCK_N"]),)  # noqa: E731
    _sample_conv2d_fwd_kernel[grid](
        xk, wk, bias if bias is not None else wk, y, idx, count,
        n, o, c, h, w, ho, wo,
        xk.stride(0), xk.stride(2), xk.stride(3), wk.stride(0), wk.stride(2), wk.stride(3), *y.stride(), idx.stride(0),
        **_geometry(weight, stride, padding, dilation),
        HAS_BIAS=bias is not None, Y_CHANNELS_LAST=is_channels_last(y), PRECISION=dot_precision(x.dtype),
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
        # dy compacted per sample, NHWC: gk[n, p, j] = dy[n, out_idx[n, j], p] (one gather; columns past O, padded
        # to a multiple of 16, repeat filter 0 and are never used past the count)
        r_cols = triton.cdiv(o, _COL_ALIGN) * _COL_ALIGN
        idx = _index_rows(out_idx, r_cols)
        gk = torch.gather(grad_y.permute(0, 2, 3, 1), 3, idx.long().view(n, 1, 1, r_cols).expand(n, ho, wo, r_cols))
        gk = gk.contiguous()

    if need_x:
        dx = empty_like_format(x, x.shape, zero=empty)
        if not empty:
            wk = channels_inner(weight)
            grid = lambda meta: (n * triton.cdiv(h * w, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]),)  # noqa: E731
            _sample_conv2d_bwd_dx_kernel[grid](
                gk, wk, dx, idx, count,
                n, c, r_cols, h, w, ho, wo,
                gk.stride(0), gk.stride(1), gk.stride(2), wk.stride(0), wk.stride(2), wk.stride(3), *dx.stride(),
                idx.stride(0), **geometry, DX_CHANNELS_LAST=is_channels_last(dx), PRECISION=prec,
            )

    fused_db = False
    if need_w:
        # fp32 buffers: samples meet through fp32 atomics (the interpreter has no fp16 atomic_add); the config's
        # pre_hook zeroes both before every launch (autotuning included)
        dw32 = (torch.zeros if empty else torch.empty)(weight.shape, dtype=torch.float32, device=weight.device)
        if not empty:
            db32 = torch.empty(o, dtype=torch.float32, device=weight.device) if need_b else dw32
            frame = _padded_frame(x, padding)
            rows = _position_rows(n, ho, wo, frame.shape[1], frame.shape[2], frame.numel() >= 2**31, tuple(stride),
                                  x.device)

            def grid(meta):
                return (triton.cdiv(r_cols, meta["BLOCK_M"]) * kh * kw * triton.cdiv(c, meta["BLOCK_N"]), n)

            _sample_conv2d_bwd_dw_kernel[grid](
                gk, frame, rows, dw32, db32, idx, count,
                n, ho * wo, r_cols, c, frame.shape[2], gk.shape[3], c, idx.stride(0), *dw32.stride(),
                KH=kh, KW=kw, DH=dilation[0], DW=dilation[1], HAS_BIAS=need_b, PRECISION=prec,
            )
            if need_b:
                db, fused_db = db32.to(weight.dtype), True
        dw = dw32.to(weight.dtype)

    if need_b and not fused_db:
        # db alone (or an empty reduction): a torch sum of dy over each sample's active filters
        per_sample = grad_y.sum((2, 3), dtype=torch.float32)  # (N, O)
        db = (per_sample * _sample_mask(out_idx, out_count, o)).sum(0).to(weight.dtype)
    return dx, dw, db
