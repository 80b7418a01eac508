"""Active-filter convolution as one Triton implicit-im2col GEMM per pass (forward, dX, dW; db is a torch sum).

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
            contributes to input row ``ih`` only when ``(ih + p - r*d) % s == 0``, so a strided layer runs one set of
            programs per stride phase (``ih % s``), each looping over the taps that reach its phase only;
* dW:       (active filters) x (active input channels), one tap per program, reduction over N*H'*W' with split-K
            (fp32 atomics into an fp32 buffer; the interpreter has no fp16 atomic_add; no split-K under
            ``torch.use_deterministic_algorithms``, so each element has one writer); db is a torch sum of the
            compact dy, outside the GEMM's loop. x arrives as a zero-padded NHWC frame with a
            per-position row table, so the loop neither divides positions nor masks padding.

Few input channels (``ROWS``, C_act < 16 with undilated columns: AlexNet's conv1 reads C = 3, a 6-byte pixel that
no 16-byte vector covers and a tap chunk that is 13/16 padding), as the hash kernel's ROWS order does: x is copied
once into a zero-padded NHWC frame with C_PAD = max(4, next_pow2(C)) channels (``_rows_frame``: 8-byte pixels in
fp16 / bf16, 16-byte in fp32; rows 16-byte aligned) and the reduction of the forward runs over a kernel row's kw *
C_PAD contiguous elements (d = r kw C_PAD + j, W as (O, kh kw C_PAD) rows, ``_rows_weight``), dW's columns are those
kw * C_PAD elements of one kernel row (11 programs of 44 columns instead of 121 of 3 channels on conv1), and dX
reads W with its channels zero-padded to 16 (the dot's N side). The zero channels meet zero weights: they never
change a result. bench.aot (conv1, fp16 / bf16 / TF32, sm_80 / sm_90): every main loop loads by cp.async (8-byte
x vectors, no 2-byte scalars), no spills, and the loop per K step is 0.85-0.98x a dense Triton GEMM's (forward),
1.07-1.18x (dW), about 1.5x (dX, split by stride phase: 1/16 of the (position, tap) steps of masking every tap).

``PER_SAMPLE`` (issue #15): the same three kernels with one active set per sample (``sample_conv2d.py``'s
launchers): a program's positions lie in one sample, it reads that sample's index row and count, and dW's second
grid axis is the sample instead of a split-K slice.

``out_count`` (a 0-d / 1-element int64 tensor on x's device) lets the ALSH layer choose its active set on the GPU
without a host sync: ``out_idx`` then has a fixed length O and only its first ``out_count`` entries are used; the
kernels launch over all O rows and the programs past the count exit without writing.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._autotune import tuned
from ._common import (
    activations_channels_last,
    autotune_configs,
    channels_inner,
    conv_out_hw,
    dot_precision,
    empty_like_format,
    is_channels_last,
    take_channels,
)
from ._gemm import (
    clamp_blocks,
    config_factory,
    dot_configs,
    inside,
    load_index,
    next_step,
    phase_taps,
    store_tile,
    valid_count,
)

# ----------------------------------------------------------------------------------------------------------------
# Autotune lists. Tiles follow the usual Hopper GEMM shapes (128x128x32 / 8 warps for large GEMMs, narrower N for
# the small active sets at fraction 0.25 of 64-channel layers); each launch prunes BLOCK_N / BLOCK_K down to the
# active set so that a 3-channel input does not pay for 64-wide K tiles. Compiled for sm_80 / sm_90 (bench.aot), the
# operand tiles arrive by 16-byte cp.async (LDGSTS), multi-buffered over num_stages, whenever the channel count is a
# multiple of 8. Not yet timed on a GPU (none was lent to the sessions that wrote them): the lists are untuned.
# ----------------------------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, fits fp32 with IEEE products). Every config compiles without spills for
# sm_80 and sm_90 in the dtypes it serves (bench.aot, full plan); IEEE fp32 runs tl.dot on FMA units with both
# operands and the accumulator in registers, so it gets the smaller tiles. Dropped for spilling: 128x64x32 / 4 warps
# / 4 stages and 256x64x32 / 8 warps (fp16, 72-688 B on sm_90), dX's 128x32x32 / 4 warps (TF32, 8 B on sm_80).
# Every tile has >= 64 rows, the smallest wgmma (a 32-row dot falls back to mma.sync on sm_90).
_FWD_TILES = [
    (128, 128, 32, 8, 3, False),
    (128, 128, 64, 8, 3, False),
    (128, 64, 32, 8, 3, True),
    (128, 64, 64, 8, 3, False),
    (64, 128, 32, 4, 4, False),
    (64, 64, 32, 4, 4, True),
    (128, 32, 32, 4, 4, True),
    (64, 32, 64, 4, 3, False),
    (64, 32, 32, 4, 3, False),
    (64, 32, 16, 4, 3, True),
]
_DX_TILES = [
    (128, 128, 32, 8, 3, False),
    (128, 128, 64, 8, 3, False),
    (128, 64, 32, 8, 3, False),
    (128, 64, 64, 8, 3, False),
    (64, 128, 32, 4, 4, False),
    (64, 64, 32, 4, 4, False),
    (64, 32, 64, 4, 3, False),
    (64, 32, 32, 4, 3, True),
    (64, 64, 16, 4, 3, False),
    (64, 32, 16, 4, 3, True),
]
# The interpreter runs one program at a time in numpy: few large programs are fastest there.
_INTERP_TILE = (64, 16, 16, 4, 1, True)


def _zero_dw(nargs):
    # dW accumulates with atomics (split-K, samples), and the autotuner runs a kernel several times while it tunes:
    # every run, the tuning ones and the final one, must start from zero, so each config zeroes the buffer first.
    nargs["dw_ptr"].zero_()


# dW: (rows x channels) tiles of one tap; split-K over N*H'*W' when there are few tiles (AlexNet conv1: 64 rows x 3
# channels per tap, 121 taps, reduction 64*55*55 = 193,600 positions). The last field: fits IEEE fp32, as above.
_DW_TILES = [
    (64, 64, 32, 4, 3, 1, True),
    (128, 64, 32, 8, 3, 1, True),
    (64, 128, 32, 4, 3, 1, False),
    (64, 64, 64, 4, 3, 4, False),
    (128, 128, 32, 8, 3, 4, False),
    (64, 32, 64, 4, 3, 16, False),
    (64, 32, 32, 4, 3, 16, True),
]
_INTERP_DW_TILE = (16, 16, 64, 4, 1, 2, True)  # SPLIT_K=2 so the interpreter tests exercise the atomic split-K path


def _configs(tiles, interp, make, skip=frozenset()):
    """(autotune list, the GPU configs, those of them that fit IEEE fp32: the tiles' last field, less ``skip``)."""
    configs = [make(*t[:-1]) for t in tiles]
    fma = [c for c, t in zip(configs, tiles) if t[-1] and t[:-1] not in skip]
    return autotune_configs(configs, make(*interp[:-1])), configs, fma


# IEEE fp32 skips a (tile, warps, stages) in the forward and dX lists alike when either list marks it False: one skip
# set for both, as the lists were compiled and checked with it (bench.aot, full plan).
_FWD_DX_NO_FMA = frozenset(t[:-1] for t in _FWD_TILES + _DX_TILES if not t[-1])


_tile = config_factory("BLOCK_M", "BLOCK_N", "BLOCK_K")
_dw_tile = config_factory("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", pre_hook=_zero_dw)


def _dw_cfg(bm, bn, bk, warps, stages, split):  # the DW tiles' field order: split after warps and stages
    return _dw_tile(bm, bn, bk, split, warps, stages)


_FWD_CONFIGS, _FWD_GPU, _FWD_FMA = _configs(_FWD_TILES, _INTERP_TILE, _tile, _FWD_DX_NO_FMA)
_DX_CONFIGS, _DX_GPU, _DX_FMA = _configs(_DX_TILES, _INTERP_TILE, _tile, _FWD_DX_NO_FMA)
_DW_CONFIGS, _DW_GPU, _DW_FMA = _configs(_DW_TILES, _INTERP_DW_TILE, _dw_cfg)

# Per-sample launches (PER_SAMPLE, issue #15) use subsets of the same lists (the tile shapes are the same GEMMs: one
# sample's positions x filters or channels): (tile, warps, stages) -> fits fp32 with IEEE products there. Dropped for
# spilling in the per-sample forward: the 128-wide filter tiles (128x128x32 / 8 warps, 64x128x32 / 4 warps; 192-424
# B in fp16 when the kernels were separate); off IEEE fp32 there: 128x64x32 / 8 warps, 64x64x32 / 4 warps and
# 128x32x32 / 4 warps (16-88 B). bench.aot, kernels sample_*.
_FWD_SAMPLE = {(128, 64, 32, 8, 3): False, (128, 64, 64, 8, 3): False, (64, 64, 32, 4, 4): False,
               (128, 32, 32, 4, 4): False, (64, 32, 32, 4, 3): False, (64, 32, 16, 4, 3): True}
_DX_SAMPLE = {(128, 128, 32, 8, 3): False, (128, 64, 32, 8, 3): False, (64, 64, 32, 4, 4): False,
              (64, 32, 32, 4, 3): True, (64, 32, 16, 4, 3): True}
# Tensor-core dots of dX: not 64x32x32 / 4 warps / 3 stages (1.51x the dense loop on sm_80), and per sample not
# 64x32x16 / 4 warps (1.51x on sm_90, its W rows gathered per step): bench.aot, fourth pass. Both stay for IEEE fp32.
_DX_TC = [c for c, t in zip(_DX_GPU, _DX_TILES) if t[:5] != (64, 32, 32, 4, 3)]


def _subset(configs, tiles, table):
    """(the configs whose (tile, warps, stages) is in ``table``, those of them marked to fit IEEE fp32)."""
    keys = [t[:5] for t in tiles]
    use = [c for c, k in zip(configs, keys) if k in table]
    return use, [c for c, k in zip(configs, keys) if table.get(k)]


_FWD_SAMPLE_GPU, _FWD_SAMPLE_FMA = _subset(_FWD_GPU, _FWD_TILES, _FWD_SAMPLE)
# Tensor-core dots of the per-batch forward: not 128x32x32 / 4 warps, whose main loop on sm_90 was 1.54-1.56x the
# dense GEMM's (149 vs 97 SASS instructions per step, fp16; each warp's 32x32 slice of the wgmma is too little work
# to cover the per-step address and mask work). It stays for IEEE fp32, where FMA dots want the narrow tile.
_FWD_TC = [c for c, t in zip(_FWD_GPU, _FWD_TILES) if t[:5] != (128, 32, 32, 4, 4)]
_DX_SAMPLE_GPU, _DX_SAMPLE_FMA = _subset(_DX_GPU, _DX_TILES, _DX_SAMPLE)
_DX_SAMPLE_TC = [c for c, t in zip(_DX_GPU, _DX_TILES) if c in _DX_SAMPLE_GPU and t[:5] != (64, 32, 16, 4, 3)]
# dW: no split-K (program_id(1) is the sample), and not 64x128x32 / 4 warps (56 B of spills on sm_80 in fp16 with
# the per-sample row and count loads, bench.aot --kernels sample_dw)
_DW_SAMPLE_GPU = [c for c in _DW_GPU if c.kwargs["SPLIT_K"] == 1 and c.kwargs["BLOCK_N"] <= 64]
_DW_COUNT_GPU = [c for c in _DW_GPU if not (c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4)]
# IEEE fp32 (FMA dots): not 128x64x32 / 8 warps either (8 B of spills on sm_90)
_DW_SAMPLE_FMA = [c for c in _DW_FMA if c in _DW_SAMPLE_GPU and c.kwargs["BLOCK_M"] <= 64]


def _for_dtype(configs, args, ptr, gpu, fma):
    """Drop the configs that spill with IEEE fp32 (FMA) products when this launch has them."""
    return dot_configs(configs, args, ptr, gpu, fma) or configs


def _rows_fit(configs, positions):
    """Per-sample launches: drop 128-row position tiles when a sample has at most 64 positions (a tile never crosses
    a sample: the extra rows would all be masked); 64 rows stay (the smallest wgmma)."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(positions))]
    return kept or configs


def _prune_fwd(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}
    # ROWS: the reduction is the kh * kw * C_PAD elements of a patch, not a tap's C_ACT channels
    k_extent = a["KH"] * a["KW"] * a["C_PAD"] if a.get("ROWS") else a["C_ACT"]
    if a.get("PER_SAMPLE"):
        use = _rows_fit(_for_dtype(configs, a, "x_ptr", _FWD_SAMPLE_GPU, _FWD_SAMPLE_FMA), a["HO"] * a["WO"])
    else:
        use = _for_dtype(configs, a, "x_ptr", _FWD_TC, _FWD_FMA)
    return clamp_blocks(use, a["N_ACT"], k_extent)


def _prune_dx(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}
    if a.get("PER_SAMPLE"):
        use = _rows_fit(_for_dtype(configs, a, "g_ptr", _DX_SAMPLE_TC, _DX_SAMPLE_FMA), a["H"] * a["W"])
    else:
        use = _for_dtype(configs, a, "g_ptr", _DX_TC, _DX_FMA)
    return clamp_blocks(use, a["C_ACT"], a["R_ACT"])


def _prune_dw(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}
    # rows are BLOCK_M here: clamp them as the "N" extent; K (positions) is never small enough to matter. ROWS: the
    # columns are a kernel row's kw * C_PAD elements
    n_extent = a["KW"] * a["C_PAD"] if a.get("ROWS") else a["C_ACT"]
    if a.get("PER_SAMPLE"):  # program_id(1) is the sample: no split-K
        gpu, fma = _DW_SAMPLE_GPU, _DW_SAMPLE_FMA
    elif a.get("HAS_COUNT"):  # the count's early exit: 64x128x32 / 4 warps spills (16 B at 255 registers, sm_90 fp16)
        gpu, fma = _DW_COUNT_GPU, _DW_FMA
    else:
        gpu, fma = _DW_GPU, _DW_FMA
    out = clamp_blocks(_for_dtype(configs, a, "g_ptr", gpu, fma), n_extent, a["R_ACT"], n_name="BLOCK_N",
                       k_name="BLOCK_M")
    if a.get("DETERMINISTIC"):
        return _without_split_k(out)
    # split-K only where each split still has several K tiles to amortize its atomics over.
    k_red = a["K_RED"]
    kept = [c for c in out if c.kwargs["SPLIT_K"] == 1 or k_red >= 8 * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"]]
    return kept or out


def _without_split_k(configs):
    """``torch.use_deterministic_algorithms(True)``: every config with SPLIT_K=1, so each dW element is written by
    one program (one fp32 atomic add into the zeroed buffer: exact, whatever the order of the programs)."""
    out, seen = [], set()
    for c in configs:
        kw = {**c.kwargs, "SPLIT_K": 1}
        sig = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(c if c.kwargs["SPLIT_K"] == 1 else triton.Config(
                kw, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=c.pre_hook))
    return out


# autotune key: the conv geometry and the dot precision (TF32 and IEEE fp32 are different kernels)
_GEOMETRY = ["KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "PRECISION"]


# All three kernels read channels_last (NHWC) activations and weights in the kernel layout (O, kh, kw, C): the
# reduction axis (channels) is the contiguous one of both operands, so a tile row is BLOCK_K consecutive elements
# and loads as 16-byte vectors (or cp.async) whenever the channel count is a multiple of 8. Index sets never gather
# along that axis inside a main loop: the launchers hand over the active input channels of x and W compacted (one
# copy of the active part, Alg. 6's hand-off is already compact) and the active filters' rows of dy compacted; the
# gathers left in the kernels pick whole rows of W (out_idx: a row's channels stay contiguous) and scatter results
# in the epilogues. Spatial work (batch / row / column of each output position) is computed once per tile; per
# (tap, chunk) step the address moves by a scalar and only the padding mask is recomputed per row.


@tuned(
    configs=_FWD_CONFIGS,
    key=["M", "N_ACT", "C_ACT", "H", "W", "Y_CHANNELS_LAST", "ROWS", "PER_SAMPLE"] + _GEOMETRY,
    prune_configs_by={"early_config_prune": _prune_fwd},
    buckets=["N_ACT", "C_ACT"],
)
@triton.jit
def _active_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, out_idx_ptr, count_ptr,
    M, N_ACT, C_ACT, H, W, HO, WO,
    sxn, sxh, sxw, swo, swh, sww, syn, syc, syh, syw, sio,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_OUT_IDX: tl.constexpr, COMPACT_OUT: tl.constexpr, HAS_COUNT: tl.constexpr,
    Y_CHANNELS_LAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr = False, C_PAD: tl.constexpr = 1, PER_SAMPLE: tl.constexpr = False,
):
    """Alg. 4 (Feeney 2019): ``y[n, A_j, oh, ow] = b[A_j] + sum_{r, t, c} x[n, oh*s-p+r*d, ow*s-p+t*d, c] *
    W[A_j, r, t, c]`` for the active filters ``A = out_idx``, x holding the C_ACT active input channels (NHWC).

    One program: BLOCK_M output positions x BLOCK_N active filters; one flat loop over (tap, BLOCK_K channel chunk),
    so that the loads of step k+1 are in flight (cp.async / TMA-free multi-buffering) while step k multiplies even
    when a tap has a single chunk.

    ``ROWS`` (few channels, ``_rows_frame``): x is the zero-padded (N, HP, WP, C_PAD) frame holding the padding,
    row pitch ``sxh``, and W the (O, D_PAD) matrix of rows (kh, kw, C_PAD) (``_rows_weight``, row stride ``swo``).
    The reduction runs over ``d = r * KW C_PAD + j``: the kw pixels of kernel row r are KW * C_PAD consecutive
    elements of the frame, so a chunk is a few contiguous, C_PAD-aligned runs (vector loads) and no load has a
    spatial mask; only the last, partial chunk is masked (peeled), so no element outside a patch is multiplied.

    ``PER_SAMPLE`` (issue #15, ``sample_conv2d_forward``): one active set per sample, row ``n`` of ``out_idx`` (row
    stride ``sio``) with ``count_ptr[n]`` entries in use. A program's positions then lie in ONE sample (the grid
    runs N x position tiles of one image x filter tiles), so the program reads its sample's count and row once;
    filter tiles past the count exit (y is allocated zeroed) and the result is scattered into the full-size y."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_ACT, BLOCK_N)
    # filter blocks vary fastest: the programs that run together share the same input tile (read once from HBM)
    pid_n = pid % num_n
    if PER_SAMPLE:
        tiles_hw = tl.cdiv(HO * WO, BLOCK_M)
        pid_p = (pid // num_n) % tiles_hw
        nb = pid // num_n // tiles_hw
        n_valid = valid_count(count_ptr + nb, N_ACT, True)
        if pid_n * BLOCK_N >= n_valid:  # past this sample's active set: its outputs stay zero
            return
        sp = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = sp < HO * WO
        if ROWS:
            sp = tl.minimum(sp, HO * WO - 1)  # as below: in bounds, never stored
        oh = sp // WO
        ow = sp - oh * WO
        idx_row = out_idx_ptr + nb.to(tl.int64) * sio
    else:
        pid_m = pid // num_n
        n_valid = valid_count(count_ptr, N_ACT, HAS_COUNT)
        if HAS_COUNT:
            if pid_n * BLOCK_N >= n_valid:  # rows past out_count: padding of the device-side active set
                return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        if ROWS:
            offs_m = tl.minimum(offs_m, M - 1)  # rows past M re-read the last position (in bounds); never stored
        ow = offs_m % WO
        t = offs_m // WO
        oh = t % HO
        nb = t // HO
        idx_row = out_idx_ptr

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_valid
    o_w = load_index(idx_row, offs_n, n_mask, HAS_OUT_IDX)
    w_rows = w_ptr + o_w.to(tl.int64) * swo
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROWS:
        ROW: tl.constexpr = KW * C_PAD
        D_TOT: tl.constexpr = KH * ROW
        FULL: tl.constexpr = D_TOT // BLOCK_K
        # frame pixel (oh s, ow s) is tap (0, 0); the column offset is a multiple of the constant SW * C_PAD and the
        # row pitch sxh a multiple of 16 (the launcher pads WP): the compiler sees C_PAD-aligned runs
        x_pos = x_ptr + nb.to(tl.int64) * sxn + ((oh * SH) * sxh + ow * (SW * C_PAD))
        for d0 in range(0, FULL * BLOCK_K, BLOCK_K):
            d = d0 + offs_k
            a = tl.load(x_pos[:, None] + ((d // ROW) * (DH * sxh) + d % ROW)[None, :])
            b = tl.load(w_rows[None, :] + d[:, None], mask=n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if D_TOT % BLOCK_K != 0:
            d = FULL * BLOCK_K + offs_k
            d_ok = d < D_TOT
            a = tl.load(x_pos[:, None] + ((d // ROW) * (DH * sxh) + d % ROW)[None, :], mask=d_ok[None, :], other=0.0)
            b = tl.load(w_rows[None, :] + d[:, None], mask=n_mask[None, :], other=0.0)  # zero past D_TOT
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        ih0 = oh * SH - PH
        iw0 = ow * SW - PW
        # int64 batch offset: a batch of large images passes 2**31 elements; ih0 / iw0 may be -PH / -PW (masked)
        x_pos = x_ptr + nb.to(tl.int64) * sxn + ih0 * sxh + iw0 * sxw
        num_cc = tl.cdiv(C_ACT, BLOCK_K)
        r = 0
        s = 0
        c0 = 0
        for kk in range(0, KH * KW * num_cc):
            ih = ih0 + r * DH
            iw = iw0 + s * DW
            valid = m_mask & inside(ih, H) & inside(iw, W)  # zero padding
            k_mask = offs_k < C_ACT - c0
            a = tl.load((x_pos + (r * DH * sxh + s * DW * sxw + c0))[:, None] + offs_k[None, :],
                        mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load((w_rows + (r * swh + s * sww + c0))[None, :] + offs_k[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            r, s, c0 = next_step(r, s, c0, C_ACT, KW, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(b_ptr + o_w, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if COMPACT_OUT or not HAS_OUT_IDX:
        o_y = offs_n
    else:
        o_y = o_w  # scatter into the full-size output; the inactive channels were zeroed by the launcher
    y_rows = y_ptr + nb.to(tl.int64) * syn + oh * syh + ow * syw
    store_tile(y_rows, o_y * syc, acc.to(y_ptr.dtype.element_ty), m_mask, n_mask, not Y_CHANNELS_LAST)


@tuned(
    configs=_DX_CONFIGS,
    key=["M", "C_ACT", "R_ACT", "HO", "WO", "DX_CHANNELS_LAST", "PER_SAMPLE"] + _GEOMETRY,
    prune_configs_by={"early_config_prune": _prune_dx},
    buckets=["C_ACT", "R_ACT"],
)
@triton.jit
def _active_conv2d_bwd_dx_kernel(
    g_ptr, w_ptr, dx_ptr, in_idx_ptr, count_ptr, out_idx_ptr,
    M, C_ACT, R_ACT, H, W, HO, WO,
    sgn, sgh, sgw, swo, swh, sww, sdn, sdc, sdh, sdw, sio,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    SCATTER_IN: tl.constexpr, HAS_COUNT: tl.constexpr, DX_CHANNELS_LAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    C_LD: tl.constexpr = 0, PER_SAMPLE: tl.constexpr = False, TAP_SH: tl.constexpr = 1, TAP_SW: tl.constexpr = 1,
):
    """Alg. 5 (Feeney 2019), ``dI`` through the active filters only: the transposed convolution

    ``dx[n, ih, iw, I_c] = sum_{r, t, j} dy[n, (ih+p-r*d)/s, (iw+p-t*d)/s, A_j] * W[A_j, r, t, I_c]``,

    where a term exists only when both quotients are exact and inside the output. dy holds the active filters'
    channels only (R_ACT of them, NHWC) and W their rows only, in the same order, each with the active input
    channels (C_ACT, innermost): the launcher compacts both, so no index is read in the loop. One program:
    BLOCK_M input positions x BLOCK_N active input channels; one flat loop over (tap, BLOCK_K filter chunk), up to
    the count. dy's columns and W's rows are zero-padded to a multiple of ``DX_FILTER_ALIGN`` (every BLOCK_K) and
    W's rows past ``out_count`` are zeroed by the launcher, so the loop's loads need no mask along the filters (R_ACT:
    the filters, which clamps the count; dy's row stride ``sgw`` is the padded width).

    Strided layers are split by stride phase: the programs of phase (pr, pc) compute the input positions
    (pr + i s, pc + j s), which only the taps r = r0, r0 + s', ... (s' = ``TAP_SH`` = s / gcd(s, d)) reach, each
    from the dy row i + (pr + p - r d) / s: a stride-1 loop over about kh kw / (s_h s_w) taps. Looping over every
    tap for every position and masking the rows whose quotient is not exact multiplied zeros for all but 1 / (s_h
    s_w) of the (position, tap) pairs: 16x the work on AlexNet's conv1 (stride 4), 4x on a stride-2 layer.

    ``C_LD`` > 0 (few channels): W's channel axis is zero-padded to C_LD, a multiple of 16, so that its rows load as
    16-byte vectors without a channel mask (C_ACT = 3 channels are 6 bytes: 2-byte scalar loads otherwise); the
    padding channels are computed as zeros and never stored.

    ``PER_SAMPLE`` (issue #15, ``sample_conv2d_backward``): dy arrives compacted per sample (column j of sample n
    holds filter ``out_idx[n, j]``, R_ACT >= O columns, zero past the sample's count), W is the whole (O, kh, kw, C)
    weight, and the B operand gathers its rows ``out_idx[n, k]`` (a row's channels stay contiguous: vector loads;
    the launcher points the entries past the count at row 0). A program's positions lie in ONE sample, and its loop
    stops at that sample's count."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_ACT, BLOCK_N)
    pid_n = pid % num_n
    # stride phases: a program's input positions share (ih mod SH, iw mod SW) = (pr, pc): positions
    # (pr + i SH, pc + j SW) for i < HI = cdiv(H, SH), j < WI = cdiv(W, SW); phases vary after the channel blocks
    HI = tl.cdiv(H, SH)
    WI = tl.cdiv(W, SW)
    rest = pid // num_n
    phase = rest % (SH * SW)
    rest = rest // (SH * SW)
    if PER_SAMPLE:
        tiles_hw = tl.cdiv(HI * WI, BLOCK_M)
        pid_p = rest % tiles_hw
        nb = rest // tiles_hw
        r_valid = valid_count(count_ptr + nb, R_ACT, True)
        sp = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = sp < HI * WI
        i = sp // WI
        j = sp - i * WI
        idx_row = out_idx_ptr + nb.to(tl.int64) * sio
    else:
        r_valid = valid_count(count_ptr, R_ACT, HAS_COUNT)
        offs_m = rest * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M  # M = N HI WI
        j = offs_m % WI
        t = offs_m // WI
        i = t % HI
        nb = t // HI
    # taps of the phase: r with (pr + p - r d) % s == 0, i.e. r0, r0 + TAP_SH, ... (TAP_SH = s / gcd(s, d)); tap r
    # reads dy row i + (pr + p - r d) / s (exact), a fixed offset from i: the loop tests bounds, never divides.
    # Positions past H / W (a phase with fewer rows or columns than HI / WI) are computed from in-bounds dy rows
    # and never stored.
    if SH == 1:  # one phase: every tap, as a plain stride-1 transposed convolution
        n_r, r0, qr0, ih = KH, 0, PH, i
    else:
        pr = phase // SW
        n_r, r0, qr0 = phase_taps(pr, KH, SH, PH, DH, TAP_SH)
        ih = pr + i * SH
    if SW == 1:
        n_s, s0, qs0, iw = KW, 0, PW, j
    else:
        pc = phase % SW
        n_s, s0, qs0 = phase_taps(pc, KW, SW, PW, DW, TAP_SW)
        iw = pc + j * SW
    QSTEP_R: tl.constexpr = TAP_SH * DH // SH  # dy rows between consecutive taps of the phase
    QSTEP_S: tl.constexpr = TAP_SW * DW // SW
    g_img = g_ptr + nb.to(tl.int64) * sgn
    th0 = i + qr0
    tw0 = j + qs0
    g_pos = g_img + th0 * sgh + tw0 * sgw  # the dy row of tap (r0, s0); the phase's later taps: fixed offsets

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_n < C_ACT
    if C_LD > 0:
        c_read = offs_n < C_LD  # constant over 16 columns: vectors
    else:
        c_read = c_mask
    w_cols = w_ptr + offs_n + (r0 * swh + s0 * sww)
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the padding rows of out_count cost nothing: the loop stops at the count
    num_kc = tl.cdiv(r_valid, BLOCK_K)
    r = 0  # the phase's tap numbers (tap r0 + r TAP_SH, s0 + s TAP_SW)
    s = 0
    k0 = 0
    for kk in range(0, n_r * n_s * num_kc):
        th = th0 - r * QSTEP_R
        tw = tw0 - s * QSTEP_S
        valid = m_mask & inside(th, HO) & inside(tw, WO)
        g_rows = g_pos - (r * QSTEP_R * sgh + s * QSTEP_S * sgw)
        w_tap = r * (TAP_SH * swh) + s * (TAP_SW * sww)
        # no mask along the filters: dy's columns and W's rows are zero-padded to a multiple of 64 (every BLOCK_K)
        # and zero past the count (see the launchers); the k masks cost 16-18 SASS instructions per step (the
        # per-vector predicates of a 2-d mask; sm_90, VGG-11, 64x64x32 / 4 warps: 128 -> 112, bench.aot)
        a = tl.load((g_rows + k0)[:, None] + offs_k[None, :], mask=valid[:, None], other=0.0)
        if PER_SAMPLE:
            # W rows of this chunk's filters (int32 offsets: the launcher checks W has < 2**31 elements)
            o_k = tl.load(idx_row + k0 + offs_k)
            b = tl.load(w_cols[None, :] + (o_k * swo + w_tap)[:, None], mask=c_read[None, :], other=0.0)
        else:
            b = tl.load((w_cols + (w_tap + k0 * swo))[None, :] + (offs_k * swo)[:, None], mask=c_read[None, :],
                        other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        r, s, k0 = next_step(r, s, k0, r_valid, n_s, BLOCK_K)

    # rows past H or W: one test of min(H - 1 - ih, W - 1 - iw) (two i1 masks there made ptxas reserve an 8-byte
    # stack frame, sm_90, conv1)
    st_mask = m_mask
    if SH * SW > 1:
        st_mask = st_mask & (tl.minimum((H - 1) - ih, (W - 1) - iw) >= 0)
    # scatter into the full-size dx (inactive channels zeroed by the launcher), or write the compact one
    c_dx = load_index(in_idx_ptr, offs_n, c_mask, SCATTER_IN)
    dx_rows = dx_ptr + nb.to(tl.int64) * sdn + ih * sdh + iw * sdw
    store_tile(dx_rows, c_dx * sdc, acc.to(dx_ptr.dtype.element_ty), st_mask, c_mask, not DX_CHANNELS_LAST)


@tuned(
    configs=_DW_CONFIGS,
    key=["K_RED", "R_ACT", "C_ACT", "KH", "KW", "DH", "DW", "PRECISION", "ROWS", "PER_SAMPLE", "DETERMINISTIC"],
    prune_configs_by={"early_config_prune": _prune_dw},
    buckets=["R_ACT", "C_ACT"],
)
@triton.jit
def _active_conv2d_bwd_dw_kernel(
    g_ptr, x_ptr, rows_ptr, dw_ptr, out_idx_ptr, in_idx_ptr, count_ptr,
    K_RED, R_ACT, C_ACT, WP, sg, sx, sdo, sdc, sdh, sdw, sio, zero_row,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_OUT_IDX: tl.constexpr, HAS_IN_IDX: tl.constexpr, HAS_COUNT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ROWS: tl.constexpr = False, C_PAD: tl.constexpr = 1, PER_SAMPLE: tl.constexpr = False,
    DETERMINISTIC: tl.constexpr = False,
):
    """Alg. 5 (Feeney 2019), the update of the active rows only:

    ``dW[A_j, I_c, r, t] = sum_{n, oh, ow} dy[n, oh, ow, A_j] * x[n, oh*s-p+r*d, ow*s-p+t*d, I_c]``, with dy the
    dense (N*H'*W', R_ACT) matrix of the active
    filters' gradients (row stride ``sg``) and x the zero-padded NHWC frame of the C_ACT active channels, whose
    pixel ``(n, ih + p, iw + p)`` is row ``(n HP + ih + p) WP + iw + p`` (row stride ``sx``).

    The reduction runs over output positions, so nothing in the loop decomposes a position: ``rows_ptr`` holds, per
    position, the frame row its tap (0, 0) reads (``_position_rows``: int32, so that ``row * sx`` is one 32-bit
    multiply, unless the frame has 2**31 elements; built once per geometry), and tap (r, t) reads the row
    ``r d WP + t d`` further on. The frame's zero border replaces the padding masks. (A table of element offsets
    would save the multiply but hide from the compiler that rows start 16-byte aligned: no vector loads.)

    One program: BLOCK_M active filters x BLOCK_N active input channels of one tap, over a 1/SPLIT_K slice of the
    N*H'*W' reduction; slices meet through fp32 atomics in the fp32 buffer ``dw_ptr`` (full (O, C, kh, kw) layout),
    zeroed by the config's pre_hook. db is the launcher's torch sum of dy (one more read of dy): fused here as a
    second dot of the dy tile with a ones column in the programs of tap 0, it kept that dot and its branch in every
    program's loop (111 SASS instructions per step against 87 without, 1.71x against 1.34x the dense GEMM; sm_90,
    VGG-11 3x3@28, 64x64x32 / 8 warps, bench.aot).

    ``ROWS`` (few channels): the frame has C_PAD channels (``_rows_frame``, zeros past C_ACT) and a program's columns
    are BLOCK_N of the KW * C_PAD contiguous elements of one kernel row r (column j = tap column t * C_PAD + channel
    c), not the channels of one tap: a row of the x tile is a contiguous, C_PAD-aligned run (vector loads;
    ``row * C_PAD`` with the constant C_PAD keeps the alignment provable), and conv1's 121 taps of 3 channels become
    11 rows of 44 columns. The epilogue splits j into (t, c) and drops the padding channels. The frame has a zero
    image after the N and ``rows_ptr`` is padded with its first pixel to a multiple of 128 positions (of every
    BLOCK_K; ``_padded_rows``), so the x loads of the last, partial K tile read zeros and carry no position mask
    (dy's are masked): the per-vector predicates of both masks cost ~4 SASS instructions per 8-byte cp.async.

    ``PER_SAMPLE`` (issue #15, ``sample_conv2d_backward``): program_id(1) is the sample n instead of a split-K slice
    (SPLIT_K is 1): the program reduces over sample n's K_RED = H'*W' positions of dy compacted per sample (column j
    holds filter ``out_idx[n, j]``, row stride ``sio``) and adds its tile into the rows ``out_idx[n, :count[n]]``;
    samples meet through the same fp32 atomics as split-K slices. With ROWS, the table entries past the sample's
    last position are replaced by ``zero_row`` (the frame's zero image), so the x tile never reads the next
    sample's pixels.

    ``DETERMINISTIC`` (``torch.use_deterministic_algorithms(True)`` at launch) changes no code: it keys the autotune
    cache, and its prune runs every config with SPLIT_K=1 (per-sample dW is then summed by the per-batch launch of
    ``tritonslide._library``, never across samples here)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(R_ACT, BLOCK_M)
    num_cb = tl.cdiv(C_ACT, BLOCK_N)
    if ROWS:
        num_cb = tl.cdiv(KW * C_PAD, BLOCK_N)
    pid_m = pid % num_m  # row blocks vary fastest: they share the x tile of this (tap, channel block)
    pid_tc = pid // num_m
    tap = pid_tc // num_cb
    cb = pid_tc % num_cb
    if ROWS:  # "tap" is the kernel row
        r = tap
        s = 0
    else:
        r = tap // KW
        s = tap % KW
    if PER_SAMPLE:
        r_valid = valid_count(count_ptr + pid_k, R_ACT, True)
        if pid_m * BLOCK_M >= r_valid:
            return
        idx_row = out_idx_ptr + pid_k.to(tl.int64) * sio
    else:
        r_valid = valid_count(count_ptr, R_ACT, HAS_COUNT)
        if HAS_COUNT:
            if pid_m * BLOCK_M >= r_valid:
                return
        idx_row = out_idx_ptr

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < r_valid  # rows stored
    m_read = offs_m < R_ACT  # rows read: dy's allocated channels (the padding rows of out_count are never stored)
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    tap_row = r * DH * WP + s * DW  # frame rows from tap (0, 0) to tap (r, s)
    if ROWS:
        tl.static_assert(128 % BLOCK_K == 0)  # the padded row table ends on a multiple of 128 positions
        c_read = offs_n < KW * C_PAD
        x_cols = tap_row * C_PAD + offs_n
        c_mask = c_read & (offs_n % C_PAD < C_ACT)  # stored: the real channels
    else:
        c_mask = offs_n < C_ACT
        c_read = c_mask

    if PER_SAMPLE:  # the sample's positions
        k_lo = pid_k * K_RED
        k_hi = k_lo + K_RED
    else:
        k_per_split = tl.cdiv(tl.cdiv(K_RED, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K_RED)
    offs_k = tl.arange(0, BLOCK_K)
    # dy^T tile (filters x positions), loaded position-major: the filters are dy's contiguous axis; the pointers
    # advance by BLOCK_K rows per step (int64 base, int32 offsets within the tile)
    g_ptrs = g_ptr + k_lo.to(tl.int64) * sg + (offs_k[:, None] * sg + offs_m[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_mask = offs_k < k_hi - k0
        a = tl.trans(tl.load(g_ptrs, mask=k_mask[:, None] & m_read[None, :], other=0.0))
        if ROWS:  # the table is padded past K_RED with the zero image: no position mask on x (see the docstring)
            if PER_SAMPLE:  # past the sample: the zero image, not the next sample
                rows = tl.load(rows_ptr + k0 + offs_k, mask=k_mask, other=zero_row)
            else:
                rows = tl.load(rows_ptr + k0 + offs_k)
            b = tl.load(x_ptr + (rows * C_PAD)[:, None] + x_cols[None, :], mask=c_read[None, :], other=0.0)
        else:
            rows = tl.load(rows_ptr + k0 + offs_k, mask=k_mask, other=0) + tap_row
            b = tl.load(x_ptr + (rows * sx)[:, None] + offs_n[None, :],
                        mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        g_ptrs += BLOCK_K * sg

    o_w = load_index(idx_row, offs_m, m_mask, HAS_OUT_IDX)
    if ROWS:
        c_w = load_index(in_idx_ptr, offs_n % C_PAD, c_mask, HAS_IN_IDX)
        dw_ptrs = dw_ptr + (o_w * sdo)[:, None] + (c_w * sdc + (offs_n // C_PAD) * sdw)[None, :] + r * sdh
    else:
        c_w = load_index(in_idx_ptr, offs_n, c_mask, HAS_IN_IDX)
        dw_ptrs = dw_ptr + (o_w * sdo)[:, None] + (c_w * sdc)[None, :] + r * sdh + s * sdw
    tl.atomic_add(dw_ptrs, acc, mask=m_mask[:, None] & c_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _int32(idx: torch.Tensor | None) -> torch.Tensor | None:
    # channel / filter numbers are < 2**31; int32 indices halve the index loads and the address arithmetic
    return None if idx is None else idx.to(torch.int32)


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


# dX reads dy's columns and W's rows zero-padded to a multiple of this (every BLOCK_K of its lists): no mask along
# the filters in its loop
DX_FILTER_ALIGN = 64


def dx_phases(h: int, w: int, stride, dilation) -> tuple[int, int, dict]:
    """The dX kernel's stride phases: (positions per image and phase, phases, the tap steps TAP_SH / TAP_SW =
    stride / gcd(stride, dilation) within a phase)."""
    sh, sw = stride
    taps = {"TAP_SH": sh // math.gcd(sh, dilation[0]), "TAP_SW": sw // math.gcd(sw, dilation[1])}
    return triton.cdiv(h, sh) * triton.cdiv(w, sw), sh * sw, taps


def _padded_frame(xk: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """x (any memory format) as a dense (N, H + 2 ph, W + 2 pw, C) tensor with a zero border: the dW kernel reads it
    without padding masks. One copy (NCHW input: the transpose is the same copy); none when there is no padding
    and x is dense NHWC already (the usual linked input)."""
    v = xk.permute(0, 2, 3, 1)
    ph, pw = padding
    if not (ph or pw):
        return v.contiguous()
    n, h, w, c = v.shape
    frame = torch.empty((n, h + 2 * ph, w + 2 * pw, c), dtype=xk.dtype, device=xk.device)
    frame[:, :ph].zero_()
    frame[:, ph + h:].zero_()
    frame[:, ph:ph + h, :pw].zero_()
    frame[:, ph:ph + h, pw + w:].zero_()
    frame[:, ph:ph + h, pw:pw + w].copy_(v)
    return frame


@lru_cache(maxsize=32)
def _position_rows(n: int, ho: int, wo: int, hp: int, wp: int, wide: bool, stride: tuple[int, int],
                   device: torch.device) -> torch.Tensor:
    """(N H' W',) the row ``(n HP + oh s) WP + ow s`` of the padded frame (``_padded_frame``) that output
    position m's tap (0, 0) reads; int32 (4 bytes per position, 200 KB for a 28x28 map at batch 64), int64 when
    ``wide`` (a frame of 2**31 elements or more: the kernel's ``row * channels`` must not wrap). Built once per
    geometry and device."""
    oh = torch.arange(ho, device=device) * (stride[0] * wp)
    ow = torch.arange(wo, device=device) * stride[1]
    nb = torch.arange(n, device=device) * (hp * wp)
    rows = nb[:, None, None] + oh[None, :, None] + ow[None, None, :]
    return rows.reshape(-1).to(torch.int64 if wide else torch.int32)


@lru_cache(maxsize=32)
def _padded_rows(n: int, ho: int, wo: int, hp: int, wp: int, wide: bool, stride: tuple[int, int], length: int,
                 device: torch.device) -> torch.Tensor:
    """``_position_rows`` padded to ``length`` entries with the first pixel of image n, the zero image of
    ``_rows_frame(..., zero_image=True)``: the ROWS tables of the dW / dA kernels, whose x loads then need no
    position mask past the end of the reduction. Built once per geometry and device."""
    rows = _position_rows(n, ho, wo, hp, wp, wide, stride, device)
    pad = torch.full((length - rows.numel(),), n * hp * wp, dtype=rows.dtype, device=device)
    return torch.cat([rows, pad])


# Channels below which the kernels reduce over kernel-row segments (``ROWS``): a pixel of C < 16 half-precision
# channels is not a whole number of 16-byte vectors, and a tap-major chunk of C channels would be mostly padding
# (AlexNet conv1: 3 of 16). The same bound as the hash kernel's ROWS order.
ROWS_MAX_CHANNELS = 16
# Row pitch of the ROWS weight matrices: a multiple of every BLOCK_K, so that the peeled last chunk reads zeros.
_ROWS_ALIGN = 128


def rows_mode(c_act: int, dilation: tuple[int, int]) -> bool:
    """Whether the ROWS reduction applies: few channels, and undilated columns (a kernel row's kw pixels must be
    adjacent in the frame for its segment to be contiguous)."""
    return 0 < c_act < ROWS_MAX_CHANNELS and dilation[1] == 1


def rows_channels(c: int) -> int:
    """C_PAD: channels padded to a power of two >= 4, so that every pixel of the frame starts on an 8-byte (fp16 /
    bf16) or 16-byte (fp32) boundary and a kernel-row segment loads as vectors of C_PAD elements. (C_PAD 8 would give
    16-byte vectors in fp16 at twice the MMA work for C = 3; cp.async takes 8-byte vectors as well.)"""
    return max(4, triton.next_power_of_2(c))


def _rows_frame(x: torch.Tensor, idx: torch.Tensor | None, padding: tuple[int, int], c_pad: int,
                zero_image: bool = False) -> torch.Tensor:
    """x (N, C, H, W), any memory format, as one dense zero-padded NHWC frame (N, H + 2 ph, WP, C_PAD) holding the
    channels ``idx`` (all when None) in order, the rest zero; WP >= W + 2 pw and WP * C_PAD a multiple of 16, so that
    every frame row starts 16-byte aligned and the kernels' ``row * pitch`` keeps that provable. The zero channels
    multiply zero weights: finite products, so they never change a result (a non-finite pixel still reaches only
    the patches that hold it). One copy (an NCHW input needs a conversion pass anyway). ``zero_image``: one more
    image of zeros after the N (N + 1 images), which padding entries of a position-row table can point at."""
    n, _, h, w = x.shape
    ph, pw = padding
    wp = w + 2 * pw
    wp += -wp % max(1, 16 // c_pad)
    frame = x.new_zeros(n + int(zero_image), h + 2 * ph, wp, c_pad)
    src = x.permute(0, 2, 3, 1)
    if idx is not None:
        src = src.index_select(3, idx)
    frame[:n, ph:ph + h, pw:pw + w, :src.shape[3]] = src
    return frame


def _rows_weight(weight: torch.Tensor, idx: torch.Tensor | None, c_pad: int) -> torch.Tensor:
    """(O, C, kh, kw) weights as the (O, D_PAD) matrix whose row o is W[o] in (kh, kw, C_PAD) order (channels ``idx``
    first, zero channels after), zero past kh*kw*C_PAD up to a multiple of ``_ROWS_ALIGN`` (aligned rows; the
    forward's peeled last chunk reads zeros there). Small: O * D_PAD elements, built per call."""
    o, _, kh, kw = weight.shape
    d_tot = kh * kw * c_pad
    wk = weight.new_zeros(o, triton.cdiv(d_tot, _ROWS_ALIGN) * _ROWS_ALIGN)
    src = weight.permute(0, 2, 3, 1)
    if idx is not None:
        src = src.index_select(3, idx)
    wk[:, :d_tot].view(o, kh, kw, c_pad)[..., :src.shape[3]] = src
    return wk


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
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], *weight.shape[-2:], stride, padding, dilation)
    n_act = o if out_idx is None else out_idx.numel()
    c_act = c if in_idx is None else in_idx.numel()
    o_y = n_act if compact_output else o
    # inactive channels (and the padding rows of out_count) are never written by the kernel: they start at zero
    scatter = out_idx is not None and not compact_output and (count is not None or n_act != o)
    y = empty_like_format(x, (n, o_y, ho, wo), zero=scatter)
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
    rows = rows_mode(c_act, dilation)
    c_pad = rows_channels(c_act) if rows else 1
    if rows:
        # few channels: the zero-padded frame of the active channels and W as (O, kh kw C_PAD) rows (ROWS order)
        x_idx = in_idx if in_idx is not None and not compact_input else None
        xk = _rows_frame(x, x_idx, padding, c_pad)
        wk = _rows_weight(weight, in_idx, c_pad)
        sx, sw = (xk.stride(0), xk.stride(1), xk.stride(2)), (wk.stride(0), 0, 0)
    else:
        # kernel operands: NHWC x holding only the active input channels (in in_idx order), W as (O, kh, kw, C_act)
        xk = activations_channels_last(x)
        if in_idx is not None and not compact_input:
            xk = take_channels(xk, in_idx)
        wk = channels_inner(weight) if in_idx is None else take_channels(weight, in_idx)
        sx, sw = (xk.stride(0), xk.stride(2), xk.stride(3)), (wk.stride(0), wk.stride(2), wk.stride(3))
    idx = _int32(out_idx)
    dummy = wk
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_act, meta["BLOCK_N"]),)  # noqa: E731
    _active_conv2d_fwd_kernel[grid](
        xk, wk, bias if bias is not None else dummy, y, idx if idx is not None else dummy,
        count if count is not None else dummy,
        m, n_act, c_act, x.shape[2], x.shape[3], ho, wo,
        *sx, *sw, *y.stride(), 0,
        **_geometry(weight, stride, padding, dilation),
        HAS_BIAS=bias is not None, HAS_OUT_IDX=idx is not None, COMPACT_OUT=bool(compact_output),
        HAS_COUNT=count is not None, Y_CHANNELS_LAST=is_channels_last(y), PRECISION=dot_precision(x.dtype),
        ROWS=rows, C_PAD=c_pad,
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
    geometry = _geometry(weight, stride, padding, dilation)
    prec = dot_precision(x.dtype)
    o_idx, i_idx = _int32(out_idx), _int32(in_idx)
    dummy = weight
    count_arg = count if count is not None else dummy
    dx = dw = db = None
    r_pad = triton.cdiv(n_act, DX_FILTER_ALIGN) * DX_FILTER_ALIGN
    if not empty and (need_x or need_w):
        # dy in NHWC holding only the active filters' channels (in out_idx order), zero-padded to r_pad columns: both
        # GEMMs then read it with vector loads (aligned rows), and dX's loop needs no mask along the filters; the
        # padding rows of out_count repeat active indices (dX multiplies them by zero rows of W, dW never stores them)
        gk = activations_channels_last(grad_y)
        if out_idx is not None and not compact_output:
            gk = take_channels(gk, out_idx, r_pad)
        elif r_pad != n_act:
            gk = take_channels(gk, None, r_pad)

    if need_x:
        scatter = in_idx is not None and not compact_input
        dx = empty_like_format(x, x.shape, zero=scatter or empty)
        if not empty:
            # W's active rows (in out_idx order; the padding rows of out_count zeroed on the device) with the active
            # channels, zero rows up to r_pad: r_pad * c_act * kh * kw elements, small next to the GEMM, and the
            # loop then reads no index and needs no mask along the filters
            w_rows = weight if out_idx is None else weight.index_select(0, out_idx)
            if count is not None:
                w_rows = w_rows * _row_mask(out_idx, count, n_act, w_rows.dtype).view(-1, 1, 1, 1)
            if r_pad != n_act:
                w_rows = torch.cat([w_rows, w_rows.new_zeros((r_pad - n_act, *w_rows.shape[1:]))])
            c_ld = 0
            if c_act < ROWS_MAX_CHANNELS:
                # few channels: W's channel axis zero-padded to 16 (vector loads of the dot's N side)
                c_ld = triton.cdiv(c_act, 16) * 16
                wk = take_channels(w_rows, in_idx, c_ld)
            elif in_idx is not None:
                wk = take_channels(w_rows, in_idx)
            elif w_rows is not weight:
                wk = w_rows.contiguous(memory_format=torch.channels_last)
            else:
                wk = channels_inner(weight)
            per_image, phases, taps = dx_phases(x.shape[2], x.shape[3], stride, dilation)
            m = n * per_image

            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * phases * triton.cdiv(c_act, meta["BLOCK_N"]),)

            _active_conv2d_bwd_dx_kernel[grid](
                gk, wk, dx, i_idx if scatter else dummy, count_arg, dummy,
                m, c_act, n_act, x.shape[2], x.shape[3], ho, wo,
                gk.stride(0), gk.stride(2), gk.stride(3), wk.stride(0), wk.stride(2), wk.stride(3), *dx.stride(), 0,
                **geometry, SCATTER_IN=scatter, HAS_COUNT=count is not None,
                DX_CHANNELS_LAST=is_channels_last(dx), PRECISION=prec, C_LD=c_ld, **taps,
            )

    if need_w:
        # an fp32 buffer: split-K meets through fp32 atomics, and fp16 atomic_add does not exist in the interpreter;
        # the config pre_hook zeroes it before every launch (autotuning included)
        dw32 = (torch.zeros if empty else torch.empty)(weight.shape, dtype=torch.float32, device=weight.device)
        if not empty:
            kh, kw = weight.shape[-2:]
            k_red = n * ho * wo
            rows_dw = rows_mode(c_act, dilation)
            c_pad = rows_channels(c_act) if rows_dw else 1
            # ROWS: the program's columns are a kernel row's kw * C_PAD elements, kh rows; else one tap's channels
            taps, n_extent = (kh, kw * c_pad) if rows_dw else (kh * kw, c_act)

            def grid(meta):
                tiles = triton.cdiv(n_act, meta["BLOCK_M"]) * taps * triton.cdiv(n_extent, meta["BLOCK_N"])
                return (tiles, meta["SPLIT_K"])

            x_idx = in_idx if in_idx is not None and not compact_input else None
            if rows_dw:
                frame = _rows_frame(x, x_idx, padding, c_pad, zero_image=True)
                rows = _padded_rows(n, ho, wo, frame.shape[1], frame.shape[2], frame.numel() >= 2**31, tuple(stride),
                                    triton.cdiv(k_red, 128) * 128, x.device)
            else:
                frame = _padded_frame(take_channels(x, x_idx) if x_idx is not None else x, padding)
                rows = _position_rows(n, ho, wo, frame.shape[1], frame.shape[2], frame.numel() >= 2**31,
                                      tuple(stride), x.device)
            _active_conv2d_bwd_dw_kernel[grid](
                gk, frame, rows, dw32, o_idx if o_idx is not None else dummy,
                i_idx if i_idx is not None else dummy, count_arg, k_red, n_act, c_act, frame.shape[2],
                gk.shape[1], frame.shape[3], *dw32.stride(), 0, 0, KH=kh, KW=kw, DH=dilation[0], DW=dilation[1],
                HAS_OUT_IDX=o_idx is not None, HAS_IN_IDX=i_idx is not None,
                HAS_COUNT=count is not None, PRECISION=prec, ROWS=rows_dw, C_PAD=c_pad,
                DETERMINISTIC=torch.are_deterministic_algorithms_enabled(),
            )
        dw = dw32.to(weight.dtype)

    if need_b:
        # a torch sum over the active rows of dy (the compact copy when the GEMMs made one), outside the dW loop
        if out_idx is None:
            db = grad_y.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
        else:
            if not empty and (need_x or need_w):
                g_act = gk[:, :n_act]
            else:
                g_act = grad_y if compact_output else grad_y.index_select(1, out_idx)
            db_act = g_act.sum((0, 2, 3), dtype=torch.float32) * _row_mask(out_idx, count, n_act, torch.float32)
            # index_add_, not index_copy_: the padding rows of out_count may repeat an active index (they add 0)
            db = torch.zeros(o, dtype=torch.float32, device=x.device).index_add_(0, out_idx, db_act).to(weight.dtype)
    return dx, dw, db
