"""Active-filter convolution as one Triton implicit-im2col GEMM per pass (forward, dX, dW with fused db).

Feeney (2019), shared/papers/001, Alg. 4-6: the ALSH layer computes only the rows ``A = out_idx`` of the weight
(Alg. 4), its backward pass sends ``dI`` through those filters alone and updates only those rows (Alg. 5), and with
last-active-set sharing it reads only the previous layer's active channels ``in_idx`` (Alg. 6). With ``m_out``,
``m_in`` the 0/1 masks of the two index sets, every launcher here equals the CPU reference
``cpu_fallback/active_conv2d.py``:

    y  = conv2d(x * m_in, W, b) * m_out
    dx = m_in * conv_transpose2d(dy * m_out, W)                      (the transposed convolution)
    dW = m_out * m_in * sum_{n, oh, ow} dy[n, o, oh, ow] * x[n, c, oh*s - p + r*d, ow*s - p + t*d]
    db = m_out * sum_{n, oh, ow} dy[n, o, oh, ow]

but nothing outside the active rows and channels is read or multiplied: the kernels load ``out_idx`` / ``in_idx``
themselves and gather rows of W and channels of x on the fly (no gathered copy, no unfold), so the work is
``|out_idx| * |in_idx| * kh * kw`` multiply-adds per output position.

GEMM views (implicit im2col; the reduction runs over taps outside and channels inside, so that the spatial part of
each address and its padding mask are computed once per tap rather than once per element):

* forward:  (N*H'*W' positions) x (active filters), reduction over (taps x active input channels);
* dX:       (N*H*W input positions) x (active input channels), reduction over (taps x active filters); a tap
            contributes to input row ``ih`` only when ``(ih + p - r*d) % s == 0`` (masked, as the transposed conv);
* dW:       (active filters) x (active input channels), one tap per program, reduction over N*H'*W' with split-K
            (fp32 atomics into an fp32 buffer; the interpreter has no fp16 atomic_add); db is summed from the same
            dy tiles by the programs of tap 0 / channel block 0.

``out_count`` (a 0-d / 1-element int64 tensor on x's device) lets the ALSH layer choose its active set on the GPU
without a host sync: ``out_idx`` then has a fixed length O and only its first ``out_count`` entries are used; the
kernels launch over all O rows and the programs past the count exit without writing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, dot_precision, next_pow2

# ----------------------------------------------------------------------------------------------------------------
# Autotune lists. Tiles follow the usual Hopper GEMM shapes (128x128x32 / 8 warps for large GEMMs, narrower N for
# the small active sets at fraction 0.25 of 64-channel layers); each launch prunes BLOCK_N / BLOCK_K down to the
# active set so that a 3-channel input does not pay for 64-wide K tiles. Not yet measured on a GPU (no device was
# lent to the session that wrote them). Compiled for sm_90, the gathered tile loads stay synchronous (their addresses
# have no provable contiguity, so no cp.async multi-buffering: 8-66 KiB of shared memory per config), which makes
# num_stages a minor knob here; occupancy hides the load latency.
# ----------------------------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, split=None, pre_hook=None):
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if split is not None:
        kwargs["SPLIT_K"] = split
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


_GEMM_TILES = [
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (256, 64, 32, 8, 3),
    (64, 32, 64, 4, 3),
]
# The interpreter runs one program at a time in numpy: few large programs are fastest there.
_INTERP_TILE = (64, 16, 16, 4, 1)


def _zero_dw_db(nargs):
    # dW / db accumulate with atomics (split-K), and the autotuner runs a kernel several times while it tunes: every
    # run, the tuning ones and the final one, must start from zero, so each config zeroes the buffers first.
    nargs["dw_ptr"].zero_()
    if nargs["HAS_BIAS"]:
        nargs["db_ptr"].zero_()


# dW: (rows x channels) tiles of one tap; split-K over N*H'*W' when there are few tiles (AlexNet conv1: 64 rows x 3
# channels per tap, 121 taps, reduction 64*55*55 = 193,600 positions).
_DW_TILES = [
    (64, 64, 32, 4, 3, 1),
    (128, 64, 32, 8, 3, 1),
    (64, 128, 32, 4, 3, 1),
    (64, 64, 64, 4, 3, 4),
    (128, 128, 32, 8, 3, 4),
    (64, 32, 64, 4, 3, 16),
    (32, 32, 128, 4, 3, 16),
]
_INTERP_DW_TILE = (16, 16, 64, 4, 1, 2)  # SPLIT_K=2 so the interpreter tests exercise the atomic split-K path


def _clamp_blocks(configs, n_extent, k_extent, n_name="BLOCK_N", k_name="BLOCK_K"):
    """Shrink BLOCK_N / BLOCK_K to the active extents (>= 16 for tl.dot) and drop the duplicates this creates."""
    n_cap, k_cap = next_pow2(n_extent), next_pow2(k_extent)
    seen, out = set(), []
    for cfg in configs:
        kw = dict(cfg.kwargs)
        kw[n_name] = min(kw[n_name], n_cap)
        kw[k_name] = min(kw[k_name], k_cap)
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key in seen:
            continue
        seen.add(key)
        out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages, pre_hook=cfg.pre_hook))
    return out


def _prune_fwd(configs, nargs, **kwargs):
    return _clamp_blocks(configs, nargs["N_ACT"], nargs["C_ACT"])


def _prune_dx(configs, nargs, **kwargs):
    return _clamp_blocks(configs, nargs["C_ACT"], nargs["R_ACT"])


def _prune_dw(configs, nargs, **kwargs):
    # rows are BLOCK_M here: clamp them as the "N" extent; K (positions) is never small enough to matter.
    out = _clamp_blocks(configs, nargs["C_ACT"], nargs["R_ACT"], n_name="BLOCK_N", k_name="BLOCK_M")
    # split-K only where each split still has several K tiles to amortize its atomics over.
    k_red = nargs["K_RED"]
    kept = [c for c in out if c.kwargs["SPLIT_K"] == 1 or k_red >= 8 * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"]]
    return kept or out


_FWD_CONFIGS = autotune_configs([_cfg(*t) for t in _GEMM_TILES], _cfg(*_INTERP_TILE))
_DX_CONFIGS = autotune_configs([_cfg(*t) for t in _GEMM_TILES], _cfg(*_INTERP_TILE))
_DW_CONFIGS = autotune_configs(
    [_cfg(*t[:5], split=t[5], pre_hook=_zero_dw_db) for t in _DW_TILES],
    _cfg(*_INTERP_DW_TILE[:5], split=_INTERP_DW_TILE[5], pre_hook=_zero_dw_db),
)

# autotune key: the conv geometry and the dot precision (TF32 and IEEE fp32 are different kernels)
_GEOMETRY = ["KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "PRECISION"]


@triton.jit
def _load_index(idx_ptr, offs, mask, HAS_INDEX: tl.constexpr):
    """``idx[offs]`` as int32 (channel numbers are small), or ``offs`` itself when the index set is "all"."""
    if HAS_INDEX:
        return tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        return offs


@triton.jit
def _valid_count(count_ptr, N_TOTAL, HAS_COUNT: tl.constexpr):
    """How many entries of ``out_idx`` are in use: ``out_count`` clamped to [0, len(out_idx)], else all of them."""
    if HAS_COUNT:
        return tl.minimum(tl.maximum(tl.load(count_ptr).to(tl.int32), 0), N_TOTAL)
    else:
        return N_TOTAL


@triton.jit
def _load_tile(row_ptrs, col_offs, row_mask, col_mask, ROWS_CONTIGUOUS: tl.constexpr):
    """The (R, C) tile at ``row_ptrs[:, None] + col_offs[None, :]`` (zero where masked).

    Gathered addresses carry no contiguity Triton can prove, and then its coalescing pass lets the last axis vary
    fastest across threads. In an NCHW tensor the contiguous axis is the spatial one (the rows here), so such a
    tile is loaded as its transpose (rows last) and transposed back in registers / shared memory."""
    if ROWS_CONTIGUOUS:
        t = tl.load(row_ptrs[None, :] + col_offs[:, None], mask=row_mask[None, :] & col_mask[:, None], other=0.0)
        return tl.trans(t)
    else:
        return tl.load(row_ptrs[:, None] + col_offs[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _store_tile(row_ptrs, col_offs, value, row_mask, col_mask, ROWS_CONTIGUOUS: tl.constexpr):
    """Store the (R, C) ``value`` at ``row_ptrs[:, None] + col_offs[None, :]``; rows fastest when contiguous."""
    if ROWS_CONTIGUOUS:
        tl.store(row_ptrs[None, :] + col_offs[:, None], tl.trans(value), mask=row_mask[None, :] & col_mask[:, None])
    else:
        tl.store(row_ptrs[:, None] + col_offs[None, :], value, mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["M", "N_ACT", "C_ACT", "H", "W", "X_CHANNELS_LAST"] + _GEOMETRY,
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _active_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, out_idx_ptr, in_idx_ptr, count_ptr,
    M, N_ACT, C_ACT, H, W, HO, WO,
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_OUT_IDX: tl.constexpr, HAS_IN_IDX: tl.constexpr, COMPACT_IN: tl.constexpr,
    COMPACT_OUT: tl.constexpr, HAS_COUNT: tl.constexpr, X_CHANNELS_LAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Alg. 4 (Feeney 2019): ``y[n, A_j, oh, ow] = b[A_j] + sum_{r, t, c} x[n, I_c, oh*s-p+r*d, ow*s-p+t*d] *
    W[A_j, I_c, r, t]`` for the active filters ``A = out_idx`` and active input channels ``I = in_idx``.

    One program: BLOCK_M output positions x BLOCK_N active filters; the reduction walks the kh*kw taps and, per
    tap, the active input channels in BLOCK_K chunks. X_CHANNELS_LAST: x and y are channels_last (else NCHW)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_ACT, BLOCK_N)
    # filter blocks vary fastest: the programs that run together share the same input tile (read once from HBM)
    pid_n = pid % num_n
    pid_m = pid // num_n
    n_valid = _valid_count(count_ptr, N_ACT, HAS_COUNT)
    if HAS_COUNT:
        if pid_n * BLOCK_N >= n_valid:  # rows past out_count: padding of the device-side active set
            return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    ow = offs_m % WO
    t = offs_m // WO
    oh = t % HO
    nb = t // HO
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_rows = x_ptr + nb.to(tl.int64) * sxn  # int64: a batch of large images passes 2**31 elements

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_valid
    o_w = _load_index(out_idx_ptr, offs_n, n_mask, HAS_OUT_IDX)
    w_cols = w_ptr + o_w * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel chunk) rather than two nested ones: with a few active channels per tap (32 at
    # fraction 0.5 of a 64-channel layer) the inner loop would have one iteration and nothing to software-pipeline.
    # The spatial part (BLOCK_M values) is recomputed per iteration; it is small next to the BLOCK_M x BLOCK_K tile.
    num_cc = tl.cdiv(C_ACT, BLOCK_K)
    for kk in range(0, KH * KW * num_cc):
        tap = kk // num_cc
        c0 = (kk - tap * num_cc) * BLOCK_K
        r = tap // KW
        s = tap % KW
        ih = ih0 + r * DH
        iw = iw0 + s * DW
        valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # zero padding
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C_ACT
        c_w = _load_index(in_idx_ptr, offs_c, c_mask, HAS_IN_IDX)
        if COMPACT_IN:  # x holds only the active channels, in in_idx order (Alg. 6 hand-off)
            c_x = offs_c
        else:
            c_x = c_w
        a = _load_tile(x_rows + ih * sxh + iw * sxw, c_x * sxc, valid, c_mask, not X_CHANNELS_LAST)
        b = tl.load((w_cols + r * swh + s * sww)[None, :] + (c_w * swc)[:, None],
                    mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + o_w, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if COMPACT_OUT or not HAS_OUT_IDX:
        o_y = offs_n
    else:
        o_y = o_w  # scatter into the full-size output; the inactive channels were zeroed by the launcher
    y_rows = y_ptr + nb.to(tl.int64) * syn + oh * syh + ow * syw
    _store_tile(y_rows, o_y * syc, acc.to(y_ptr.dtype.element_ty), m_mask, n_mask, not X_CHANNELS_LAST)


@triton.autotune(
    configs=_DX_CONFIGS,
    key=["M", "C_ACT", "R_ACT", "HO", "WO", "X_CHANNELS_LAST", "G_CHANNELS_LAST"] + _GEOMETRY,
    prune_configs_by={"early_config_prune": _prune_dx},
)
@triton.jit
def _active_conv2d_bwd_dx_kernel(
    g_ptr, w_ptr, dx_ptr, out_idx_ptr, in_idx_ptr, count_ptr,
    M, C_ACT, R_ACT, H, W, HO, WO,
    sgn, sgc, sgh, sgw, swo, swc, swh, sww, sdn, sdc, sdh, sdw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_OUT_IDX: tl.constexpr, HAS_IN_IDX: tl.constexpr, COMPACT_IN: tl.constexpr, COMPACT_OUT: tl.constexpr,
    HAS_COUNT: tl.constexpr, X_CHANNELS_LAST: tl.constexpr, G_CHANNELS_LAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Alg. 5 (Feeney 2019), ``dI`` through the active filters only: the transposed convolution

    ``dx[n, I_c, ih, iw] = sum_{r, t, j} dy[n, A_j, (ih+p-r*d)/s, (iw+p-t*d)/s] * W[A_j, I_c, r, t]``,

    where a term exists only when both quotients are exact and inside the output. One program: BLOCK_M input
    positions x BLOCK_N active input channels; the reduction walks taps and, per tap, the active filters."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_ACT, BLOCK_N)
    pid_n = pid % num_n
    pid_m = pid // num_n
    r_valid = _valid_count(count_ptr, R_ACT, HAS_COUNT)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    iw = offs_m % W
    t = offs_m // W
    ih = t % H
    nb = t // H
    g_rows = g_ptr + nb.to(tl.int64) * sgn

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_n < C_ACT
    c_w = _load_index(in_idx_ptr, offs_n, c_mask, HAS_IN_IDX)
    w_cols = w_ptr + c_w * swc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat loop over (tap, filter chunk), as in the forward kernel; the padding rows of out_count cost nothing
    num_kc = tl.cdiv(r_valid, BLOCK_K)
    for kk in range(0, KH * KW * num_kc):
        tap = kk // num_kc
        k0 = (kk - tap * num_kc) * BLOCK_K
        r = tap // KW
        s = tap % KW
        th = ih + PH - r * DH
        tw = iw + PW - s * DW
        oh = th // SH
        ow = tw // SW
        # th < 0 is masked first, so C-style truncating division of negatives never matters
        valid = m_mask & (th >= 0) & (tw >= 0) & (oh < HO) & (ow < WO)
        if SH > 1:
            valid = valid & ((th % SH) == 0)
        if SW > 1:
            valid = valid & ((tw % SW) == 0)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < r_valid
        o_w = _load_index(out_idx_ptr, offs_k, k_mask, HAS_OUT_IDX)
        if COMPACT_OUT or not HAS_OUT_IDX:
            o_g = offs_k
        else:
            o_g = o_w  # dy is full-size: read only the active channels
        a = _load_tile(g_rows + oh * sgh + ow * sgw, o_g * sgc, valid, k_mask, not G_CHANNELS_LAST)
        b = tl.load((w_cols + r * swh + s * sww)[None, :] + (o_w * swo)[:, None],
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if COMPACT_IN or not HAS_IN_IDX:
        c_dx = offs_n
    else:
        c_dx = c_w  # scatter into the full-size dx; the inactive channels were zeroed by the launcher
    dx_rows = dx_ptr + nb.to(tl.int64) * sdn + ih * sdh + iw * sdw
    _store_tile(dx_rows, c_dx * sdc, acc.to(dx_ptr.dtype.element_ty), m_mask, c_mask, not X_CHANNELS_LAST)


@triton.autotune(
    configs=_DW_CONFIGS,
    key=["K_RED", "R_ACT", "C_ACT", "X_CHANNELS_LAST", "G_CHANNELS_LAST"] + _GEOMETRY,
    prune_configs_by={"early_config_prune": _prune_dw},
)
@triton.jit
def _active_conv2d_bwd_dw_kernel(
    g_ptr, x_ptr, dw_ptr, db_ptr, out_idx_ptr, in_idx_ptr, count_ptr,
    K_RED, R_ACT, C_ACT, H, W, HO, WO,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sdo, sdc, sdh, sdw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_OUT_IDX: tl.constexpr, HAS_IN_IDX: tl.constexpr, COMPACT_IN: tl.constexpr,
    COMPACT_OUT: tl.constexpr, HAS_COUNT: tl.constexpr, X_CHANNELS_LAST: tl.constexpr, G_CHANNELS_LAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Alg. 5 (Feeney 2019), the update of the active rows only:

    ``dW[A_j, I_c, r, t] = sum_{n, oh, ow} dy[n, A_j, oh, ow] * x[n, I_c, oh*s-p+r*d, ow*s-p+t*d]`` and
    ``db[A_j] = sum_{n, oh, ow} dy[n, A_j, oh, ow]``.

    One program: BLOCK_M active filters x BLOCK_N active input channels of one tap, over a 1/SPLIT_K slice of the
    N*H'*W' reduction; slices meet through fp32 atomics in the fp32 buffers ``dw_ptr`` (full (O, C, kh, kw)
    layout) and ``db_ptr``, zeroed by the config's pre_hook."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(R_ACT, BLOCK_M)
    num_cb = tl.cdiv(C_ACT, BLOCK_N)
    pid_m = pid % num_m  # row blocks vary fastest: they share the x tile of this (tap, channel block)
    pid_tc = pid // num_m
    tap = pid_tc // num_cb
    cb = pid_tc % num_cb
    r = tap // KW
    s = tap % KW
    r_valid = _valid_count(count_ptr, R_ACT, HAS_COUNT)
    if HAS_COUNT:
        if pid_m * BLOCK_M >= r_valid:
            return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < r_valid
    o_w = _load_index(out_idx_ptr, offs_m, m_mask, HAS_OUT_IDX)
    if COMPACT_OUT or not HAS_OUT_IDX:
        o_g = offs_m
    else:
        o_g = o_w
    g_rows = g_ptr + o_g * sgc

    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_n < C_ACT
    c_w = _load_index(in_idx_ptr, offs_n, c_mask, HAS_IN_IDX)
    if COMPACT_IN:
        c_x = offs_n
    else:
        c_x = c_w
    x_cols = x_ptr + c_x * sxc

    k_per_split = tl.cdiv(tl.cdiv(K_RED, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K_RED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        ow = offs_k % WO
        t = offs_k // WO
        oh = t % HO
        nb = t // HO
        nb64 = nb.to(tl.int64)
        # dy tile (filters x positions): positions are the contiguous axis of an NCHW dy, filters of an NHWC one
        a = tl.trans(_load_tile(nb64 * sgn + oh * sgh + ow * sgw, g_rows, k_mask, m_mask, not G_CHANNELS_LAST))
        ih = oh * SH - PH + r * DH
        iw = ow * SW - PW + s * DW
        xv = k_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = _load_tile(nb64 * sxn + ih * sxh + iw * sxw, x_cols, xv, c_mask, not X_CHANNELS_LAST)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            if pid_tc == 0:  # db once per row block: only the programs of tap 0 / channel block 0 sum dy
                db_acc += tl.sum(a.to(tl.float32), axis=1)

    dw_ptrs = dw_ptr + (o_w * sdo)[:, None] + (c_w * sdc)[None, :] + r * sdh + s * sdw
    tl.atomic_add(dw_ptrs, acc, mask=m_mask[:, None] & c_mask[None, :])
    if HAS_BIAS:
        if pid_tc == 0:
            tl.atomic_add(db_ptr + o_w, db_acc, mask=m_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _out_hw(x, weight, stride, padding, dilation):
    kh, kw = weight.shape[-2:]
    h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return h, w


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _new(shape, like: torch.Tensor, zero: bool, dtype=None) -> torch.Tensor:
    """A fresh tensor in ``like``'s memory format (the output of a channels_last input is channels_last)."""
    fmt = torch.channels_last if _channels_last(like) else torch.contiguous_format
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)
    return out.zero_() if zero else out


def _check_count(name, out_idx, out_count, compact_output, device):
    if out_count is None:
        return None
    if compact_output:
        raise ValueError(f"{name}: out_count needs compact_output=False (the output size would depend on the count)")
    if out_idx is None:
        raise ValueError(f"{name}: out_count needs out_idx (the first out_count entries are the active rows)")
    if not isinstance(out_count, torch.Tensor) or out_count.numel() != 1 or out_count.dtype != torch.int64:
        raise TypeError(f"{name}: out_count must be a 0-d or 1-element int64 tensor, got {out_count!r}")
    if out_count.device != device:
        raise ValueError(f"{name}: out_count is on {out_count.device} but x is on {device}")
    return out_count.reshape(1)


def _row_mask(out_idx, out_count, n_act, dtype):
    """1 for the rows of ``out_idx`` in use (the first ``out_count``), 0 for the padding; float, device-side."""
    ones = torch.ones(n_act, dtype=dtype, device=out_idx.device)
    if out_count is None:
        return ones
    return ones * (torch.arange(n_act, device=out_idx.device) < out_count.reshape(())).to(dtype)


def _geometry(weight, stride, padding, dilation):
    kh, kw = weight.shape[-2:]
    return {"KH": kh, "KW": kw, "SH": stride[0], "SW": stride[1], "PH": padding[0], "PW": padding[1],
            "DH": dilation[0], "DW": dilation[1]}


def active_conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_idx: torch.Tensor | None,
    in_idx: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    compact_input: bool = False,
    compact_output: bool = False,
    out_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """``conv2d(x * m_in, weight, bias) * m_out`` on the active rows and channels (Feeney 2019, Alg. 4 and 6).

    Same arguments and result as ``torch_active_conv2d``; ``out_count`` (0-d int64 on x's device) keeps only the
    first ``out_count`` entries of ``out_idx`` (the rest is padding, never written). The result has x's memory
    format (NCHW or channels_last)."""
    name = "tritonslide.kernels.active_conv2d_forward"
    count = _check_count(name, out_idx, out_count, compact_output, x.device)
    n = x.shape[0]
    o, c = weight.shape[:2]
    ho, wo = _out_hw(x, weight, stride, padding, dilation)
    n_act = o if out_idx is None else out_idx.numel()
    c_act = c if in_idx is None else in_idx.numel()
    o_y = n_act if compact_output else o
    # inactive channels (and the padding rows of out_count) are never written by the kernel: they start at zero
    scatter = out_idx is not None and not compact_output and (count is not None or n_act != o)
    y = _new((n, o_y, ho, wo), x, zero=scatter)
    if n == 0 or n_act == 0 or ho * wo == 0:
        return y.zero_()
    if c_act == 0:  # no active input channel: only the bias of the active rows remains
        y.zero_()
        if bias is not None:
            if out_idx is None:
                y += bias.view(1, -1, 1, 1)
            else:
                b_act = bias.index_select(0, out_idx) * _row_mask(out_idx, count, n_act, bias.dtype)
                if compact_output:
                    y += b_act.view(1, -1, 1, 1)
                else:
                    y += torch.zeros_like(bias).index_add_(0, out_idx, b_act).view(1, -1, 1, 1)
        return y

    m = n * ho * wo
    dummy = weight
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_act, meta["BLOCK_N"]),)  # noqa: E731
    _active_conv2d_fwd_kernel[grid](
        x, weight, bias if bias is not None else dummy, y,
        out_idx if out_idx is not None else dummy, in_idx if in_idx is not None else dummy,
        count if count is not None else dummy,
        m, n_act, c_act, x.shape[2], x.shape[3], ho, wo,
        *x.stride(), *weight.stride(), *y.stride(),
        **_geometry(weight, stride, padding, dilation),
        HAS_BIAS=bias is not None, HAS_OUT_IDX=out_idx is not None, HAS_IN_IDX=in_idx is not None,
        COMPACT_IN=bool(compact_input) and in_idx is not None, COMPACT_OUT=bool(compact_output),
        HAS_COUNT=count is not None, X_CHANNELS_LAST=_channels_last(x), PRECISION=dot_precision(x.dtype),
    )
    return y


def active_conv2d_backward(
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
    out_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx, dW, db)`` of :func:`active_conv2d_forward` (Feeney 2019, Alg. 5), zero outside the active
    rows and channels; ``dx`` in the compact form when ``compact_input``, in x's memory format."""
    name = "tritonslide.kernels.active_conv2d_backward"
    count = _check_count(name, out_idx, out_count, compact_output, x.device)
    need_x, need_w, need_b = needs[0], needs[1], needs[2] and has_bias
    n = x.shape[0]
    o, c = weight.shape[:2]
    ho, wo = grad_y.shape[2], grad_y.shape[3]
    if grad_y.dtype != x.dtype:  # tl.dot needs both operands in one dtype
        grad_y = grad_y.to(x.dtype)
    n_act = o if out_idx is None else out_idx.numel()
    c_act = c if in_idx is None else in_idx.numel()
    empty = n == 0 or n_act == 0 or c_act == 0 or ho * wo == 0
    dummy = weight
    flags = dict(
        HAS_OUT_IDX=out_idx is not None, HAS_IN_IDX=in_idx is not None,
        COMPACT_IN=bool(compact_input) and in_idx is not None, COMPACT_OUT=bool(compact_output),
        HAS_COUNT=count is not None, X_CHANNELS_LAST=_channels_last(x), G_CHANNELS_LAST=_channels_last(grad_y),
        PRECISION=dot_precision(x.dtype), **_geometry(weight, stride, padding, dilation),
    )
    idx_args = (out_idx if out_idx is not None else dummy, in_idx if in_idx is not None else dummy,
                count if count is not None else dummy)
    dx = dw = db = None

    if need_x:
        scatter = in_idx is not None and not compact_input
        dx = _new(x.shape, x, zero=scatter or empty)
        if not empty:
            m = n * x.shape[2] * x.shape[3]
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_act, meta["BLOCK_N"]),)  # noqa: E731
            _active_conv2d_bwd_dx_kernel[grid](
                grad_y, weight, dx, *idx_args,
                m, c_act, n_act, x.shape[2], x.shape[3], ho, wo,
                *grad_y.stride(), *weight.stride(), *dx.stride(),
                **flags,
            )

    fused_db = False
    if need_w:
        # fp32 buffers: split-K meets through fp32 atomics, and fp16 atomic_add does not exist in the interpreter
        # the config pre_hook zeroes both buffers before every launch (autotuning included)
        dw32 = (torch.zeros if empty else torch.empty)(weight.shape, dtype=torch.float32, device=weight.device)
        if not empty:
            db32 = torch.empty(o, dtype=torch.float32, device=weight.device) if need_b else dw32
            kh, kw = weight.shape[-2:]
            k_red = n * ho * wo

            def grid(meta):
                tiles = triton.cdiv(n_act, meta["BLOCK_M"]) * kh * kw * triton.cdiv(c_act, meta["BLOCK_N"])
                return (tiles, meta["SPLIT_K"])

            _active_conv2d_bwd_dw_kernel[grid](
                grad_y, x, dw32, db32, *idx_args,
                k_red, n_act, c_act, x.shape[2], x.shape[3], ho, wo,
                *grad_y.stride(), *x.stride(), *dw32.stride(),
                HAS_BIAS=need_b, **flags,
            )
            if need_b:
                db, fused_db = db32.to(weight.dtype), True
        dw = dw32.to(weight.dtype)

    if need_b and not fused_db:
        # db alone (or an empty reduction): a torch sum over the active rows of dy
        if out_idx is None:
            db = grad_y.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
        else:
            g_act = grad_y if compact_output else grad_y.index_select(1, out_idx)
            db_act = g_act.sum((0, 2, 3), dtype=torch.float32) * _row_mask(out_idx, count, n_act, torch.float32)
            # index_add_, not index_copy_: the padding rows of out_count may repeat an active index (they add 0)
            db = torch.zeros(o, dtype=torch.float32, device=x.device).index_add_(0, out_idx, db_act).to(weight.dtype)
    return dx, dw, db
