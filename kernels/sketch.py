"""Fused Triton kernels of the sketch-then-unsketch chains ``y = B (A * x) + bias`` (SK-CONV / SK-FC).

Kasiviswanathan, Narodytska, Jin (shared/papers/004), eq. 2 and 4: every sketch term of a layer is the product
``I_in mat(A)^T B^T`` of the im2col matrix ``I_in`` (M x K, ``M = N H' W'`` output positions, ``K = C kh kw``) with
an r-column factor and an O x r factor; the terms are concatenated along r, so one chain is the whole layer:

    z = I_in A^T            (M x r)  -- conv2d(x, A), implicit im2col, kept on chip
    y[:, out_idx] = z B[out_idx]^T + bias[out_idx]          other channels 0

Backward (sec. 3.1, for the factors as a whole; ``G`` = dL/dy restricted to the active channels):

    dZ = G B_act                      (M x r)
    dB[out_idx] = G^T z,  db[out_idx] = 1^T G               (zeros elsewhere)
    dA = dZ^T I_in                    (r x K)  -- implicit-GEMM conv weight gradient of (x, dZ)
    dX = col2im(dZ A)                          -- transposed conv of dZ with A

The full weight ``B A`` (O x K) is never formed. SK-FC is the same chain with ``kh = kw = H = W = 1``: the linear
launchers view ``x`` (M, in) as (M, in, 1, 1) and run the conv kernels.

Layouts (issue #12): the kernels' native layout puts the reduction axis innermost, so that every operand of the
main loops arrives as 16-byte vectors / cp.async (or TMA-free wgmma operands from shared memory on sm_90):

- activations x, grad_y and z as dense NHWC (position-major rows of C / O / r channels): the launchers take them as
  they are when channels_last and convert an NCHW tensor once (``activations_channels_last``);
- A in the kernel layout (r, kh, kw, C) (``channels_inner``: a copy cached per weight version), B (O, r) row-major;
- outputs in the op contract's memory format (y, z, dx follow x): their stores are in the epilogues, through strides;
- out_idx as int32 in the forward (y's channels gathered in the epilogue, B's rows as vectors); in the backward
  G's active columns are compacted once, so dZ and dB run the same dense loops with or without it.

Reductions over the im2col axis run tap-major wherever the channels fill a tile: an outer loop over the kh kw taps
computes the row pointers and padding masks once per tap, the inner loop over channel (or r) chunks only advances
pointers, as a dense GEMM's K loop does. With few channels (C < 16, AlexNet conv1: C = 3) the forward and dA run in
the ROWS order of ``active_conv2d`` / the hash kernel: x copied once into a zero-padded NHWC frame of C_PAD =
max(4, next_pow2(C)) channels and K ordered as kernel-row segments (kh x (kw C_PAD), contiguous in the frame), so
the x tiles load as 8-byte (fp16) / 16-byte (fp32) cp.async vectors without spatial masks; dX reads A with its
channels padded to 16. (Flattened, gathered K remains for column-dilated convs with C < 16 and tap-major-unfit C.)

Kernels (STYLE practice 1: ``_<op>_fwd_kernel`` -> launchers ``<op>_forward`` / ``<op>_backward``):

- ``_sketch_conv2d_fwd_kernel``: one program per tile of ``BLOCK_M`` output positions reads its im2col rows of x
  once per r chunk, accumulates the ``BLOCK_M x BLOCK_R`` z tile in fp32 registers, casts it to the input dtype and
  multiplies it by the gathered rows ``out_idx`` of B, ``BLOCK_O`` output channels at a time, adding the bias:
  every y element is written once, inactive channels as zeros by the same kernel (no memset pass). z is written
  too, because the backward needs it (r channels: small next to y). When r is larger than one r tile
  (``MAX_BLOCK_R``), each r chunk's z tile is computed and stored, then the y loop reads the program's own z rows
  back (L2-resident, after a CTA barrier) instead of keeping O accumulators alive across r chunks (which would need
  BLOCK_M x O fp32 registers). With few position tiles (a linear layer at batch 64: one tile) the output channels
  are split over ``O_SPLIT`` programs, each recomputing the z tile: that trades the first GEMM's FLOPs for
  parallelism and is chosen only when the position tiles alone cannot fill the GPU.
- ``_sketch_conv2d_bwd_dz_kernel``: dZ = G B_act, one read of G (per r tile; one tile when r <= 128).
- ``_sketch_conv2d_bwd_db_kernel``: dB and db in one pass over G (db is the row sum of the G^T tile the dB GEMM
  loads anyway, taken by a second, 16-column dot on the tensor cores; with TF32 products torch sums db instead).
  G is thus read twice in the backward: dZ reduces over O and dB over M, and fusing both into one pass would need
  an atomic add of an O x r tile per position tile (about 10^8 atomics on a VGG layer).
- ``_sketch_conv2d_bwd_da_kernel``: dA, the only backward kernel that reads x (once); the im2col row of each
  (tap, position) comes from an int32 table built once per geometry (``_tap_rows``), not from divisions.
- ``_sketch_conv2d_bwd_dx_kernel``: dX as an implicit GEMM over the input positions (gather form of the transposed
  conv: no atomics). With stride s only 1/s^2 of the taps hit an output position; those taps are masked, not skipped.

Reductions over M (dB, dA) and over O (dZ, when the position tiles are few) are split over ``SPLIT`` programs that
write fp32 partial sums, added by torch afterwards: deterministic, no atomics (so autotune needs no reset_to_zero).

Limits (not yet measured on a GPU: the session that wrote this had none): on a small batch of a linear layer
(64 rows of 4096) the first GEMM of a position tile runs in one program over all of K, so its latency bounds the
forward; a split-K z kernel followed by a gather GEMM for y is the next step if the benchmark shows it.
fp64 is not supported (the op layer sends only fp32 / fp16 / bf16 here).
"""

from __future__ import annotations

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
    interpreting,
    next_pow2,
)
from ._gemm import clamp_blocks, config_factory, four_byte, fp32_fma, positions, prune_by_dot
from .active_conv2d import _padded_rows, _rows_frame, _rows_weight, rows_channels, rows_mode

# Largest r tile kept in registers. 128 fp32 columns x BLOCK_M 128 is the size of a standard GEMM accumulator; r in
# {d/16, d/8, d/4} of the VGG / AlexNet layers (<= 128) then needs one chunk. Under the interpreter the tile is 16
# so that the tests' small r exercise the r loop.
MAX_BLOCK_R = 16 if interpreting() else 128

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)  # the op layer's KERNEL_DTYPES


@lru_cache(maxsize=8)
def _target_programs(device_index: int | None) -> int:
    """Programs that fill the GPU (two per SM); 4 under the interpreter, so that small test shapes take the split
    paths too."""
    if interpreting() or not torch.cuda.is_available():
        return 4
    return 2 * torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def _split(work_tiles: int, reduction: int, chunk: int, device: torch.device) -> int:
    """How many programs share one reduction of length ``reduction`` (at least ``chunk`` rows each) so that
    ``work_tiles * split`` reaches the target."""
    target = _target_programs(device.index if device.type == "cuda" else None)
    if interpreting():  # small chunks, so that the tests' small shapes split too
        chunk = min(chunk, 16)
    if work_tiles >= target:
        return 1
    return max(1, min(triton.cdiv(target, work_tiles), triton.cdiv(reduction, chunk), 64))


def _tap_major(c: int) -> bool:
    """K runs tap-major (outer loop over the kh*kw taps, inner loop over channel chunks) when the channels fill a
    tile: the x tile is then a row-pointer vector plus a contiguous channel vector (16-byte loads in NHWC). With few
    channels (AlexNet conv1: C = 3) a tap-major tile would be 13/16 padding, so K = (tap, c) is flattened as in the
    kernel layout (r, kh, kw, C) and gathered element-wise."""
    return c % 16 == 0 or c >= 64


# Element offsets are int32 inside the kernels (row index * C, tap * C, ...): enough for every activation below 2^31
# elements (a batch of 64 224x224x64 maps is 2^27.6), and half the address instructions of int64.
_MAX_NUMEL = 2**31 - 1


def _check_numel(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.numel() > _MAX_NUMEL:
            raise ValueError(f"tritonslide.kernels.sketch: tensors over 2^31 elements are not supported ({t.shape})")


def _dense_nhwc_strides(c: int, h: int, w: int) -> tuple[int, int, int]:
    """(n, h, w) strides of a dense NHWC tensor: what ``activations_channels_last`` returns, whatever strides PyTorch
    reports for its size-1 dimensions."""
    return h * w * c, w * c, c


# ---------------------------------------------------------------------------------------------------- helpers


@triton.jit
def _z_chunk(x_ptr, a_ptr, x_row, ih0, iw0, m_mask, r0, C, H, W, R, sxh, sxw, dh, dw,
             KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
             ROWS: tl.constexpr, C_PAD: tl.constexpr):
    """z[m, r0:r0+BLOCK_R] = sum_k I_in[m, k] A[r, k] for the program's positions, in fp32.

    x is dense NHWC (``x_row`` = n * H W C), A is (r, kh, kw, C) (``k = tap C + c``). Tap-major: per tap the row
    pointers and the padding mask are computed once; the inner loop over channel chunks only advances both pointers
    by BLOCK_K along contiguous channels, as a dense GEMM's K loop does (16-byte / cp.async loads).

    ``ROWS`` (C < 16): x is the zero-padded (N, HP, WP, C_PAD) frame holding the padding (``x_row``: the element of
    position m's tap (0, 0), ``sxh`` the frame's row pitch) and A the (r, D_PAD) matrix of rows (kh, kw, C_PAD)
    (``active_conv2d._rows_weight``); k = i * KW C_PAD + j runs over kernel-row segments, contiguous in the frame:
    C_PAD-aligned vector loads, no spatial mask, only the last (peeled) chunk masked."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    kk = KH * KW * C
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if ROWS:
        ROW: tl.constexpr = KW * C_PAD
        D_TOT: tl.constexpr = KH * ROW
        D_PAD: tl.constexpr = (D_TOT + 127) // 128 * 128  # _rows_weight's row pitch
        FULL: tl.constexpr = D_TOT // BLOCK_K
        a_rows = a_ptr + offs_r * D_PAD
        for d0 in range(0, FULL * BLOCK_K, BLOCK_K):
            d = d0 + offs_k
            xt = tl.load(x_ptr + x_row[:, None] + ((d // ROW) * (dh * sxh) + d % ROW)[None, :])
            at = tl.load(a_rows[None, :] + d[:, None], mask=r_mask[None, :], other=0.0)
            acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        if D_TOT % BLOCK_K != 0:
            d = FULL * BLOCK_K + offs_k
            xt = tl.load(x_ptr + x_row[:, None] + ((d // ROW) * (dh * sxh) + d % ROW)[None, :],
                         mask=(d < D_TOT)[None, :], other=0.0)
            at = tl.load(a_rows[None, :] + d[:, None], mask=r_mask[None, :], other=0.0)  # zero past D_TOT
            acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    elif TAP_MAJOR:
        for tap in range(0, KH * KW):
            i = tap // KW
            j = tap - i * KW
            ih = ih0 + i * dh
            iw = iw0 + j * dw
            ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_ptrs = x_ptr + (x_row + ih * sxh + iw * sxw)[:, None] + offs_k[None, :]
            a_ptrs = a_ptr + (offs_r * kk + tap * C)[None, :] + offs_k[:, None]
            for c0 in range(0, C, BLOCK_K):
                cm = offs_k < C - c0
                xt = tl.load(x_ptrs, mask=ok[:, None] & cm[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=cm[:, None] & r_mask[None, :], other=0.0)
                acc = tl.dot(xt, at, acc, input_precision=PRECISION)
                x_ptrs += BLOCK_K
                a_ptrs += BLOCK_K
    else:
        for k0 in range(0, kk, BLOCK_K):
            k = k0 + offs_k
            tap = k // C
            c = k - tap * C
            i = tap // KW
            j = tap - i * KW
            ih = ih0[:, None] + (i * dh)[None, :]
            iw = iw0[:, None] + (j * dw)[None, :]
            km = k < kk
            mask = m_mask[:, None] & km[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(x_ptr + x_row[:, None] + ih * sxh + iw * sxw + c[None, :], mask=mask, other=0.0)
            at = tl.load(a_ptr + (offs_r * kk)[None, :] + k[:, None], mask=km[:, None] & r_mask[None, :], other=0.0)
            acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    return acc


# ---------------------------------------------------------------------------------------------------- forward


_fwd_cfg = config_factory("BLOCK_M", "BLOCK_K", "BLOCK_O")
# Tensor-core tiles: BLOCK_M >= 64 (one wgmma per 4-warp group on sm_90; the 32-row tiles fell back to mma.sync);
# BLOCK_K 64: a K step of z then issues as many MMAs as a y step (K = BLOCK_R = 64 for the plan's r), and the y loop
# (an epilogue: B tile, bias, store) runs O / BLOCK_O times per tile against the z loop's kh kw C / BLOCK_K.
# FMA tiles (fp32 IEEE): K 16/32 with 8 warps, the largest dense FMA GEMM tiles that compile without spills in
# bench.aot (64x64x32 w8: 114 registers). 128x64x32 / 4 warps was dropped: it spills 8 B on sm_80 with Triton 3.6 (the
# GPU image's version; clean with 3.9).
_FWD_TC = [_fwd_cfg(128, 64, 64, 8, 3), _fwd_cfg(64, 64, 64, 4, 3), _fwd_cfg(64, 64, 32, 4, 4)]
_FWD_FMA = [_fwd_cfg(64, 16, 32, 8, 3), _fwd_cfg(32, 32, 32, 4, 3), _fwd_cfg(32, 16, 32, 4, 3)]
_FWD_CONFIGS = autotune_configs(_FWD_TC + _FWD_FMA, _fwd_cfg(32, 16, 16, 4, 1))


def _fwd_limits(cfg, args):
    kw = cfg.kwargs
    rows = args.get("ROWS", False)
    if kw["BLOCK_M"] == 128 and cfg.num_warps == 4 and (
            four_byte(args, "x_ptr") or not args["SINGLE_R"] or not (args["TAP_MAJOR"] or rows)):
        # 128 rows on 4 warps fit only the lean path: with TF32 operands (300 B), the r loop (88 B, fc6 r = 256) or
        # the flattened-K gathers (840 B, AlexNet conv1) they spill (bench.aot, sm_80 / sm_90)
        return False
    if rows:  # the reduction is kh * kw * C_PAD long
        return kw["BLOCK_K"] <= max(32, next_pow2(args["KH"] * args["KW"] * args["C_PAD"]))
    return kw["BLOCK_K"] <= max(32, next_pow2(args["C"])) if args["TAP_MAJOR"] else True


_fwd_by_dot = prune_by_dot(_FWD_TC, _FWD_FMA, "x_ptr", _fwd_limits)


def _fwd_prune(configs, nargs, **kwargs):
    """The forward's configs (:func:`_fwd_limits`) with BLOCK_O cut to the output channels (>= 16). The y loop runs
    over O in BLOCK_O chunks, one B tile, bias and y tile each: with O = 4 (the degenerate 4x4 layer) a 64-wide chunk
    loads, converts and stores 60 padding columns, one 2-byte scalar each (y rows of 4 channels fit no vector), and
    this loop, the only one with an MMA when kh kw C fits one BLOCK_K, was 2.9x the dense GEMM (305 instructions,
    bench.aot sm_90, 64x64x64 w4). BLOCK_O is no GEMM dimension of the z loop, so its tiles stay those of the list."""
    kept = _fwd_by_dot(configs, nargs, **kwargs)
    return clamp_blocks(kept, {**nargs, **kwargs}["OC"], 1 << 30, n_name="BLOCK_O")


@tuned(configs=_FWD_CONFIGS,
       key=["M", "C", "R", "OC", "OA", "O_SPLIT", "KH", "KW", "SINGLE_R", "PRECISION", "ROWS"],
       prune_configs_by={"early_config_prune": _fwd_prune},
       buckets=["OA"])
@triton.jit
def _sketch_conv2d_fwd_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, perm_ptr, y_ptr, z_ptr,
    M, C, H, W, OH, OW, R, OC, OA, O_SPLIT,
    sxn, sxh, sxw, syn, syc, syh, syw, szn, szc, szh, szw,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
    SINGLE_R: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    ROWS: tl.constexpr = False, C_PAD: tl.constexpr = 1,
):
    """``z = conv2d(x, A)``, ``y[:, perm[:OA]] = z B[perm[:OA]]^T + bias``, ``y[:, perm[OA:]] = 0`` (eq. 2 / 4).

    x dense NHWC, A (r, kh, kw, C), B (O, r) row-major; y and z stored through their strides (x's memory format).
    ``perm`` (int32): the active channels first, then the inactive ones (identity without ``out_idx``).
    ``ROWS``: x is the zero-padded frame and A the row matrix of :func:`_z_chunk`'s ROWS order (C < 16).
    """
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if ROWS:
        offs_m = tl.minimum(offs_m, M - 1)  # rows past M re-read the last position (in bounds), never stored
    n, oh, ow = positions(offs_m, OH, OW)
    x_row = n * sxn
    ih0 = oh * sh - ph
    iw0 = ow * sw - pw
    if ROWS:  # the frame element of tap (0, 0): the padding is in the frame; a multiple of C_PAD
        x_row = x_row + (oh * sh) * sxh + (ow * sw) * C_PAD
    y_pos = n * syn + oh * syh + ow * syw
    z_pos = n * szn + oh * szh + ow * szw
    out_ty = y_ptr.dtype.element_ty
    offs_rb = tl.arange(0, BLOCK_R)
    offs_kb = tl.arange(0, BLOCK_K)

    if SINGLE_R:
        z = _z_chunk(x_ptr, a_ptr, x_row, ih0, iw0, m_mask, 0, C, H, W, R, sxh, sxw, dh, dw,
                     KH, KW, TAP_MAJOR, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, ROWS, C_PAD)
        zc = z.to(out_ty)  # the backward and the torch path see z rounded to the input dtype: so does the 2nd GEMM
        r_mask = offs_rb < R
        tl.store(z_ptr + z_pos[:, None] + (offs_rb * szc)[None, :], zc,
                 mask=(offs_m < M - pid_o * M)[:, None] & r_mask[None, :])  # only the first program of an O split
    else:
        # Every program of an O split stores the same z rows (identical values): it reads them back itself below.
        for r0 in range(0, R, BLOCK_R):
            z = _z_chunk(x_ptr, a_ptr, x_row, ih0, iw0, m_mask, r0, C, H, W, R, sxh, sxw, dh, dw,
                         KH, KW, TAP_MAJOR, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, ROWS, C_PAD)
            offs_r = r0 + offs_rb
            tl.store(z_ptr + z_pos[:, None] + (offs_r * szc)[None, :], z.to(out_ty),
                     mask=m_mask[:, None] & (offs_r < R)[None, :])
        tl.debug_barrier()  # the z rows written by other threads of this program are read below

    # Chunks of active channels (j0 < OA): GEMM, bias, store. The chunks of inactive channels only get zeros, in a
    # loop of their own: a branch between the two in one loop kept the zero tile's register moves and the merge of
    # both results in the GEMM's loop (alexnet conv1 64x64x64 w4, where LLVM unrolls the z loop and this loop is the
    # one with the MMAs: 177 instructions, 1.67x the dense GEMM; bench.aot sm_90). Not software-pipelined: a step's B
    # tile is small and read once, and its cp.async bookkeeping lengthened the loop (vgg 64x64x32 w4 s4: 133 vs 111).
    STEP = O_SPLIT * BLOCK_O
    for j0 in tl.range(pid_o * BLOCK_O, OA, STEP, num_stages=1):
        offs_j = j0 + tl.arange(0, BLOCK_O)
        j_mask = offs_j < OC
        if HAS_IDX:
            ch = tl.load(perm_ptr + offs_j, mask=j_mask, other=0)
        else:
            ch = offs_j
        active = offs_j < OA  # (OA <= OC)
        if SINGLE_R:
            bt = tl.load(b_ptr + ch[None, :] * R + offs_rb[:, None], mask=active[None, :] & r_mask[:, None],
                         other=0.0)
            acc = tl.dot(zc, bt, input_precision=PRECISION, out_dtype=tl.float32)
        else:  # z read back in BLOCK_K chunks: the FMA configs' register budget (and L2-resident rows)
            acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_K):
                offs_r = r0 + offs_kb
                rm = offs_r < R
                zt = tl.load(z_ptr + z_pos[:, None] + (offs_r * szc)[None, :], mask=m_mask[:, None] & rm[None, :],
                             other=0.0)
                bt = tl.load(b_ptr + ch[None, :] * R + offs_r[:, None], mask=active[None, :] & rm[:, None],
                             other=0.0)
                acc = tl.dot(zt, bt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ch, mask=active, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_pos[:, None] + (ch * syc)[None, :], acc.to(out_ty), mask=m_mask[:, None] & j_mask[None, :])
    if HAS_IDX:  # (without out_idx OA = OC: no inactive channel)
        # the first chunk of this program's progression past OA: every later one holds inactive channels only
        j_zero = pid_o * BLOCK_O + tl.maximum(tl.cdiv(OA - pid_o * BLOCK_O, STEP), 0) * STEP
        for j0 in range(j_zero, OC, STEP):
            offs_j = j0 + tl.arange(0, BLOCK_O)
            j_mask = offs_j < OC
            ch = tl.load(perm_ptr + offs_j, mask=j_mask, other=0)
            tl.store(y_ptr + y_pos[:, None] + (ch * syc)[None, :], tl.zeros((BLOCK_M, BLOCK_O), dtype=out_ty),
                     mask=m_mask[:, None] & j_mask[None, :])


# ---------------------------------------------------------------------------------------------------- backward


_dz_cfg = config_factory("BLOCK_M", "BLOCK_O", "BLOCK_R")
_DZ_TC = [_dz_cfg(128, 64, 64, 8, 3), _dz_cfg(128, 32, 64, 4, 4), _dz_cfg(64, 64, 64, 4, 3),
          _dz_cfg(128, 64, 128, 8, 3), _dz_cfg(64, 32, 128, 4, 3)]
_DZ_FMA = [_dz_cfg(64, 32, 64, 8, 3), _dz_cfg(64, 16, 64, 8, 3)]
_DZ_CONFIGS = autotune_configs(_DZ_TC + _DZ_FMA, _dz_cfg(32, 16, 16, 4, 1))


def _r_limits(cfg, args):
    """dZ and dB: no BLOCK_R wider than the sketch rank (a 128-wide r tile for r = 64 is half padding)."""
    return cfg.kwargs["BLOCK_R"] <= max(64, next_pow2(args["R"]))


def _dz_limits(cfg, args):
    """dZ: :func:`_r_limits`, and not 128x32 / 4 warps when G's rows are no whole number of 16-byte vectors (LDG % 8:
    the degenerate 4-channel layer): Triton gives that G tile one element per thread and row, an address, a 2-byte
    load and a 2-byte shared store each (148 SASS instructions per step, 1.51x the dense GEMM; bench.aot sm_90),
    where the 64-wide tiles share one address among 8 elements."""
    kw = cfg.kwargs
    scalar_rows = args["LDG"] % 8 != 0 and kw["BLOCK_M"] == 128 and kw["BLOCK_O"] == 32 and cfg.num_warps == 4
    return _r_limits(cfg, args) and not scalar_rows


@tuned(configs=_DZ_CONFIGS, key=["M", "R", "OA", "SPLIT", "PRECISION"],
       prune_configs_by={"early_config_prune": prune_by_dot(_DZ_TC, _DZ_FMA, "g_ptr", _dz_limits)},
       buckets=["OA"])
@triton.jit
def _sketch_conv2d_bwd_dz_kernel(
    g_ptr, b_ptr, dz_ptr,
    M, R, OA, LDG, SPLIT, o_per_split,
    PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dZ[m, r] = sum_o G_act[m, o] B_act[o, r]`` over this split's share of the active channels. G_act is dense
    (M, OA) with row stride LDG (NHWC grad_y, or its active columns compacted by the launcher), B_act (OA, r) row-major;
    dZ (M, r) row-major (the
    dA and dX kernels read r-contiguous rows). ``PARTIAL``: fp32 partial sums at ``dz_ptr + split * M * R``."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.minimum(offs_m, M - 1)  # rows past M re-read row M - 1 (in bounds), never stored: no row mask below
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_o = tl.arange(0, BLOCK_O)
    j_start = pid_s * o_per_split
    j_end = tl.minimum(j_start + o_per_split, OA)
    j_full = j_start + (j_end - j_start) // BLOCK_O * BLOCK_O
    # int32 element offsets, loop-invariant (the launcher checks G below 2^31 elements); a step adds the scalar j0 to
    # the base pointers: one IMAD.WIDE per G element and no mask. With rows that no vector fits (LDG = 4: the
    # degenerate 4-channel layer) G loads as 2-byte scalars, and the old loop, which carried a masked 64-bit pointer
    # per element, spent 6 instructions on each (358 per step, 2.52x the dense GEMM; bench.aot sm_90 64x64x64 w4).
    g_base = g_ptr + (rows * LDG)[:, None] + offs_o[None, :]
    b_base = b_ptr + offs_o[:, None] * R + offs_r[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j0 in range(j_start, j_full, BLOCK_O):
        gt = tl.load(g_base + j0)
        bt = tl.load(b_base + j0 * R, mask=r_mask[None, :], other=0.0)
        acc = tl.dot(gt.to(bt.dtype), bt, acc, input_precision=PRECISION)
    if j_full < j_end:  # the partial last chunk, peeled: the only masked step
        om = offs_o < j_end - j_full
        gt = tl.load(g_base + j_full, mask=om[None, :], other=0.0)
        bt = tl.load(b_base + j_full * R, mask=om[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(gt.to(bt.dtype), bt, acc, input_precision=PRECISION)
    ptrs = dz_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    mask = m_mask[:, None] & r_mask[None, :]
    if PARTIAL:
        tl.store(ptrs + pid_s.to(tl.int64) * M * R, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(dz_ptr.dtype.element_ty), mask=mask)


_db_cfg = config_factory("BLOCK_O", "BLOCK_R", "BLOCK_M")
_DB_TC = [_db_cfg(64, 64, 64, 4, 3), _db_cfg(128, 64, 32, 8, 3), _db_cfg(128, 64, 64, 8, 3),
          _db_cfg(64, 128, 32, 4, 3), _db_cfg(128, 128, 32, 8, 3)]
_DB_FMA = [_db_cfg(64, 64, 32, 8, 3), _db_cfg(64, 64, 16, 4, 3)]
_DB_CONFIGS = autotune_configs(_DB_TC + _DB_FMA, _db_cfg(16, 16, 32, 4, 1))


@tuned(configs=_DB_CONFIGS, key=["M", "R", "OA", "SPLIT", "NEED_B", "NEED_BIAS", "PRECISION"],
       prune_configs_by={"early_config_prune": prune_by_dot(_DB_TC, _DB_FMA, "g_ptr", _r_limits)},
       buckets=["OA"])
@triton.jit
def _sketch_conv2d_bwd_db_kernel(
    g_ptr, z_ptr, dbw_ptr, dbias_ptr,
    M, R, OA, LDG, SPLIT, m_per_split,
    NEED_B: tl.constexpr, NEED_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial sums over this split's positions of ``dB_act = G_act^T z`` (OA x r) and ``db_act = 1^T G_act``,
    written (fp32) at ``[split]`` of (SPLIT, OA, R) and (SPLIT, OA). G_act (M, OA) with row stride LDG (the launcher
    compacts the active columns), z dense (M, r).

    db rides on the tensor cores as a second dot of the same G^T tile with a (BLOCK_M x 16) matrix whose first column
    is ones: a row sum of the tile in registers would cost a convert and an add per element plus a cross-thread
    reduction every step (the old loop: 8.9x the dense GEMM). Not for fp32 with TF32 products: TF32 would round G
    (db is an exact fp32 sum in cuDNN), and 3xTF32 doubled the loop and spilled 1.1 KB on sm_90, so the launcher
    sums db with torch there (one more read of G, fp32 only)."""
    pid_j = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_j = pid_j * BLOCK_O + tl.arange(0, BLOCK_O)
    j_mask = offs_j < OA
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_mb = tl.arange(0, BLOCK_M)
    m_start = pid_s * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    rows = (m_start + offs_mb).to(tl.int64)
    g_ptrs = g_ptr + offs_j[:, None] + (rows * LDG)[None, :]
    z_ptrs = z_ptr + (rows * R)[:, None] + offs_r[None, :]
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_O, 16), dtype=tl.float32)
    first_col = (offs_mb[:, None] >= 0) & (tl.arange(0, 16)[None, :] == 0)
    ones = tl.where(first_col, 1.0, 0.0).to(g_ptr.dtype.element_ty)
    for m0 in range(m_start, m_end, BLOCK_M):
        mm = offs_mb < m_end - m0
        gt = tl.load(g_ptrs, mask=j_mask[:, None] & mm[None, :], other=0.0)
        if NEED_B:
            zt = tl.load(z_ptrs, mask=mm[:, None] & r_mask[None, :], other=0.0)
            acc = tl.dot(gt.to(zt.dtype), zt, acc, input_precision=PRECISION)
        if NEED_BIAS:
            bacc = tl.dot(gt, ones, bacc, input_precision=PRECISION)
        g_ptrs += BLOCK_M * LDG
        z_ptrs += BLOCK_M * R
    if NEED_B:
        ptrs = dbw_ptr + pid_s * OA * R + offs_j[:, None] * R + offs_r[None, :]
        tl.store(ptrs, acc, mask=j_mask[:, None] & r_mask[None, :])
    if NEED_BIAS:
        bsum = tl.sum(bacc, axis=1)  # exact: only the first column is non-zero
        # db once, by r tile 0; written as a vector condition because the interpreter rejects `j_mask & (pid_r == 0)`
        tl.store(dbias_ptr + pid_s * OA + offs_j, bsum, mask=j_mask & (offs_j < OA - pid_r * OA))


_da_cfg = config_factory("BLOCK_R", "BLOCK_K", "BLOCK_M")
_DA_TC = [_da_cfg(64, 64, 64, 4, 3), _da_cfg(64, 128, 32, 4, 3), _da_cfg(64, 128, 64, 8, 3),
          _da_cfg(128, 64, 32, 8, 3), _da_cfg(128, 128, 32, 8, 3)]
# TF32: both operands of dA are M-major (dZ^T and the im2col rows are contiguous along r and c, the reduction runs
# over positions), and TF32 MMAs take K-major operands only, so they are transposed on the way to the tensor cores;
# these tiles keep that within 1.45x of the dense GEMM's loop on sm_90 (64x64x64 w4: 1.59x, bench.aot).
_DA_TF32 = [_da_cfg(64, 64, 32, 4, 3), _da_cfg(64, 128, 64, 8, 3), _da_cfg(128, 64, 32, 8, 3)]
_DA_FMA = [_da_cfg(64, 64, 32, 8, 3), _da_cfg(64, 64, 16, 4, 3)]
_DA_CONFIGS = autotune_configs(_DA_TC + _DA_TF32 + _DA_FMA, _da_cfg(16, 16, 32, 4, 1))


def _da_limits(cfg, args):
    kw = cfg.kwargs
    ok = kw["BLOCK_R"] <= max(64, next_pow2(args["R"]))
    if args.get("ROWS"):
        ok = ok and kw["BLOCK_K"] <= max(64, next_pow2(args["KH"] * args["KW"] * args["C_PAD"]))
    elif args["TAP_MAJOR"]:
        ok = ok and kw["BLOCK_K"] <= max(64, next_pow2(args["C"]))
    return ok


@tuned(configs=_DA_CONFIGS, key=["M", "C", "R", "SPLIT", "KH", "KW", "PRECISION", "ROWS"],
       prune_configs_by={"early_config_prune": prune_by_dot(_DA_TC, _DA_FMA, "x_ptr", _da_limits, _DA_TF32)})
@triton.jit
def _sketch_conv2d_bwd_da_kernel(
    x_ptr, dz_ptr, rows_ptr, da_ptr,
    M, C, H, W, OH, OW, R, SPLIT, m_per_split,
    sxn, sxh, sxw, sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, ROW_TABLE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr = False, C_PAD: tl.constexpr = 1,
):
    """Partial ``dA[r, k] = sum_m dZ[m, r] I_in[m, k]`` over this split's positions (the conv weight gradient of
    (x, dZ) as an implicit GEMM), fp32 at ``[split]`` of (SPLIT, R, kh kw C) (A's kernel layout).

    Tap-major tiles (one tap, BLOCK_K channels): the im2col row of position m for the program's tap is the NHWC row
    ``rows[tap, m]`` (int32, -1 where the tap falls in the padding), a table built once per geometry by the launcher,
    so a step costs one int32 load per row instead of two integer divisions and four bound checks. ``ROW_TABLE``
    False: 1x1, stride 1, no padding (SK-FC), where the row is m itself.

    ``ROWS`` (C < 16): x is the zero-padded (N + 1, HP, WP, C_PAD) frame (row pitch ``sxh``, image N all zeros),
    ``rows_ptr`` the frame pixel of each position's tap (0, 0) (``active_conv2d._position_rows``) padded to the
    splits' end with image N's first pixel, and k runs over the kernel-row order k = i * KW C_PAD + j of
    :func:`_z_chunk`'s ROWS (dA in (r, kh, kw, C_PAD), C_PAD-aligned contiguous runs). The column offsets and mask
    of the program's k tile are computed once; each split's share is a multiple of 128 positions (of every
    BLOCK_M), so a tile past the end of M is the last split's and reads zeros there: the x loads carry no position
    mask (its per-vector predicates were 40 of 169 SASS instructions per step, sm_90, conv1, 64x128x32 / 4 warps)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_mb = tl.arange(0, BLOCK_M)
    kk = KH * KW * C
    m_start = pid_s * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    dz_ptrs = dz_ptr + offs_r[:, None] + ((m_start + offs_mb).to(tl.int64) * R)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if ROWS:
        ROW: tl.constexpr = KW * C_PAD
        kk = KH * ROW
        koff = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = koff < kk
        cols = (koff // ROW) * (dh * sxh) + koff % ROW
        t_ptrs = rows_ptr + m_start + offs_mb
        tl.static_assert(128 % BLOCK_M == 0)  # the launcher's split shares are multiples of 128 positions
        for m0 in range(m_start, m_end, BLOCK_M):
            mm = offs_mb < m_end - m0
            row = tl.load(t_ptrs)  # past M: the zero image
            xt = tl.load(x_ptr + (row * C_PAD)[:, None] + cols[None, :], mask=kmask[None, :], other=0.0)
            dzt = tl.load(dz_ptrs, mask=r_mask[:, None] & mm[None, :], other=0.0)
            acc = tl.dot(dzt, xt, acc, input_precision=PRECISION)
            t_ptrs += BLOCK_M
            dz_ptrs += BLOCK_M * R
    elif TAP_MAJOR:
        ct = tl.cdiv(C, BLOCK_K)
        tap = pid_k // ct
        offs_c = (pid_k - tap * ct) * BLOCK_K + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        koff = tap * C + offs_c
        if ROW_TABLE:
            t_ptrs = rows_ptr + tap * M + m_start + offs_mb
            for m0 in range(m_start, m_end, BLOCK_M):
                mm = offs_mb < m_end - m0
                row = tl.load(t_ptrs, mask=mm, other=-1)
                xt = tl.load(x_ptr + (row * C)[:, None] + offs_c[None, :], mask=(row >= 0)[:, None] & c_mask[None, :],
                             other=0.0)
                dzt = tl.load(dz_ptrs, mask=r_mask[:, None] & mm[None, :], other=0.0)
                acc = tl.dot(dzt, xt, acc, input_precision=PRECISION)
                t_ptrs += BLOCK_M
                dz_ptrs += BLOCK_M * R
        else:
            x_ptrs = x_ptr + ((m_start + offs_mb).to(tl.int64) * C)[:, None] + offs_c[None, :]
            for m0 in range(m_start, m_end, BLOCK_M):
                mm = offs_mb < m_end - m0
                xt = tl.load(x_ptrs, mask=mm[:, None] & c_mask[None, :], other=0.0)
                dzt = tl.load(dz_ptrs, mask=r_mask[:, None] & mm[None, :], other=0.0)
                acc = tl.dot(dzt, xt, acc, input_precision=PRECISION)
                x_ptrs += BLOCK_M * C
                dz_ptrs += BLOCK_M * R
        kmask = c_mask
    else:  # few channels: K = (tap, c) flattened, gathered element-wise
        koff = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = koff < kk
        tap = koff // C
        c = koff - tap * C
        i = tap // KW
        j = tap - i * KW
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + offs_mb
            mm = offs_m < m_end
            n, oh, ow = positions(offs_m, OH, OW)
            ih = (oh * sh - ph)[:, None] + (i * dh)[None, :]
            iw = (ow * sw - pw)[:, None] + (j * dw)[None, :]
            mask = mm[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(x_ptr + (n * sxn)[:, None] + ih * sxh + iw * sxw + c[None, :], mask=mask, other=0.0)
            dzt = tl.load(dz_ptrs, mask=r_mask[:, None] & mm[None, :], other=0.0)
            acc = tl.dot(dzt, xt, acc, input_precision=PRECISION)
            dz_ptrs += BLOCK_M * R
    ptrs = da_ptr + pid_s * R * kk + offs_r[:, None] * kk + koff[None, :]
    tl.store(ptrs, acc, mask=r_mask[:, None] & kmask[None, :])


_dx_cfg = config_factory("BLOCK_M", "BLOCK_C", "BLOCK_R")
_DX_TC = [_dx_cfg(128, 64, 32, 4, 3), _dx_cfg(128, 128, 32, 8, 3), _dx_cfg(64, 64, 64, 4, 3),
          _dx_cfg(128, 64, 64, 8, 3), _dx_cfg(64, 128, 32, 4, 3)]
_DX_FMA = [_dx_cfg(64, 64, 32, 8, 3), _dx_cfg(64, 64, 16, 4, 3)]
_DX_CONFIGS = autotune_configs(_DX_TC + _DX_FMA, _dx_cfg(32, 16, 16, 4, 1))


def _dx_limits(cfg, args):
    kw = cfg.kwargs
    if args["sdc"] != 1 and (kw["BLOCK_C"] == 128 or (kw["BLOCK_M"] == 128 and cfg.num_warps == 4)):
        return False  # an NCHW dx tile is transposed for its stores: these spill 72-208 B (bench.aot)
    return kw["BLOCK_C"] <= max(64, next_pow2(args["C"])) and kw["BLOCK_R"] <= max(32, next_pow2(args["R"]))


@tuned(configs=_DX_CONFIGS, key=["MI", "C", "R", "KH", "KW", "PRECISION"],
       prune_configs_by={"early_config_prune": prune_by_dot(_DX_TC, _DX_FMA, "dz_ptr", _dx_limits)})
@triton.jit
def _sketch_conv2d_bwd_dx_kernel(
    dz_ptr, a_ptr, dx_ptr,
    MI, C, H, W, OH, OW, R,
    sdn, sdc, sdh, sdw, sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, UNIT_STRIDE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    C_A: tl.constexpr = 0,
):
    """``dX[n, c, ih, iw] = sum_{i, j, r} dZ[n, oh, ow, r] A[r, i, j, c]`` over the taps with
    ``ih = oh s_h - p_h + i d_h`` (same for w): the transposed conv, gathered per input position. Tap-major: per tap
    the dZ row of every input position and its mask are computed once; the inner loop over r chunks advances the
    pointers of dZ (M, r) and A (r, kh, kw, C) along contiguous axes. ``C_A`` > 0 (C < 16): A's channel axis is
    zero-padded to C_A (a multiple of 16, by the launcher), so its rows load as 16-byte vectors with a mask that is
    constant over 16 channels (C = 3 channels are 6 bytes: 2-byte scalar loads otherwise); the padding channels are
    computed as zeros and never stored."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = offs_p < MI
    n, ih, iw = positions(offs_p, H, W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_rb = tl.arange(0, BLOCK_R)
    if C_A > 0:
        ca = C_A
        c_read = offs_c < C_A
    else:
        ca = C
        c_read = c_mask
    kk = KH * KW * ca
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in range(0, KH * KW):
        i = tap // KW
        j = tap - i * KW
        th = ih + ph - i * dh
        tw = iw + pw - j * dw
        if UNIT_STRIDE:
            oh = th
            ow = tw
            ok = p_mask & (th >= 0) & (th < OH) & (tw >= 0) & (tw < OW)
        else:
            thc = tl.maximum(th, 0)  # // and % of negative ints differ between C and Python: keep them >= 0
            twc = tl.maximum(tw, 0)
            oh = thc // sh
            ow = twc // sw
            ok = p_mask & (th >= 0) & (tw >= 0) & (oh * sh == thc) & (ow * sw == twc) & (oh < OH) & (ow < OW)
        m = (n * OH + oh) * OW + ow
        dz_ptrs = dz_ptr + (m * R)[:, None] + offs_rb[None, :]
        a_ptrs = a_ptr + (offs_rb * kk)[:, None] + (tap * ca + offs_c)[None, :]
        for r0 in range(0, R, BLOCK_R):
            rm = offs_rb < R - r0
            dzt = tl.load(dz_ptrs, mask=ok[:, None] & rm[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=rm[:, None] & c_read[None, :], other=0.0)
            acc = tl.dot(dzt, at, acc, input_precision=PRECISION)
            dz_ptrs += BLOCK_R
            a_ptrs += BLOCK_R * kk
    ptrs = dx_ptr + (n * sdn + ih * sdh + iw * sdw)[:, None] + (offs_c * sdc)[None, :]
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------------------------------- launchers


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"tritonslide.kernels.sketch.{name}: unsupported dtype {x.dtype} (fp16, bf16, fp32)")


def _active(out_idx: torch.Tensor | None, o: int) -> torch.Tensor | None:
    """``None`` when every channel is active (as the torch fallback treats a full index set)."""
    return None if out_idx is None or out_idx.numel() == o else out_idx


@lru_cache(maxsize=32)
def _tap_rows(n, h, w, oh, ow, kh, kw, stride, padding, dilation, device) -> torch.Tensor:
    """(kh kw, N OH OW) int32: the NHWC row ``(n H + ih) W + iw`` of x that tap (i, j) of output position m reads,
    -1 where it falls in the padding (the dA kernel's im2col rows; 4 bytes per position and tap, built once per
    geometry: 1.8 MB for a VGG 3x3 layer at batch 64)."""
    ih = (torch.arange(oh, device=device) * stride[0] - padding[0])[None, :] + \
        (torch.arange(kh, device=device) * dilation[0])[:, None]  # (kh, oh)
    iw = (torch.arange(ow, device=device) * stride[1] - padding[1])[None, :] + \
        (torch.arange(kw, device=device) * dilation[1])[:, None]  # (kw, ow)
    ok = ((ih >= 0) & (ih < h))[:, None, None, :, None] & ((iw >= 0) & (iw < w))[None, :, None, None, :]
    row = (torch.arange(n, device=device) * h)[None, None, :, None, None] + ih[:, None, None, :, None]
    row = row * w + iw[None, :, None, None, :]
    return torch.where(ok, row, -1).to(torch.int32).reshape(kh * kw, n * oh * ow)


def _conv_forward(x, a, b, bias, out_idx, stride, padding, dilation, y, z, kind="conv"):
    """Runs the forward kernel on 4-d x (N, C, H, W), writing y (N, O, OH, OW) and z (N, r, OH, OW) (any strides).

    The kernel reads x as dense NHWC (converted once here when x is NCHW) and A in its kernel layout (r, kh, kw, C),
    cached per weight version by ``channels_inner``: the reduction axis (channels) is then contiguous in both."""
    n, c, h, w = x.shape
    r, _, kh, kw = a.shape
    o = b.shape[0]
    oh, ow = y.shape[2], y.shape[3]
    m = n * oh * ow
    if m == 0:
        return
    rows = kind == "conv" and rows_mode(c, dilation)
    c_pad = rows_channels(c) if rows else 1
    if rows:  # C < 16: the zero-padded frame and A's (r, kh kw C_PAD) rows (ROWS order, see _z_chunk)
        x = _rows_frame(x, None, padding, c_pad)
        a = _rows_weight(a, None, c_pad)
        sx = (x.stride(0), x.stride(1), x.stride(2))
    else:
        x = activations_channels_last(x)
        a = channels_inner(a)
        sx = _dense_nhwc_strides(c, h, w)
    b = b.contiguous()
    _check_numel(x, y, z)
    idx = _active(out_idx, o)
    oa = o if idx is None else idx.numel()
    perm = None
    if idx is not None:  # the active channels first, then the inactive ones; no host sync
        inactive = torch.ones(o, dtype=torch.int32, device=x.device)
        inactive[idx] = 0
        perm = torch.argsort(inactive, stable=True).to(torch.int32)
    prec = dot_precision(x.dtype, kind)
    block_r = min(next_pow2(r), MAX_BLOCK_R)
    # Splitting the output channels repeats the first GEMM (the larger one on convs: r C kh kw vs O r per position)
    # in every program, so it is used only where the position tiles fill under a quarter of the target (a linear
    # layer on a small batch), and at most 16-fold. (Under the interpreter, whose target is a token 4, below it.)
    m_tiles = triton.cdiv(m, 64)
    target = _target_programs(x.device.index if x.device.type == "cuda" else None)
    few = m_tiles < (target if interpreting() else target // 4)
    o_split = min(16, _split(m_tiles, max(oa, 1), 64, x.device)) if few else 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), o_split)  # noqa: E731
    _sketch_conv2d_fwd_kernel[grid](
        x, a, b, bias if bias is not None else b, perm if perm is not None else b, y, z,
        m, c, h, w, oh, ow, r, o, oa, o_split,
        *sx, *y.stride(), *z.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, TAP_MAJOR=_tap_major(c), HAS_BIAS=bias is not None, HAS_IDX=perm is not None,
        ROWS=rows, C_PAD=c_pad,
        # fp32 IEEE (FMA dots) re-reads z in K chunks: a register z tile as the A operand of a K = BLOCK_R FMA dot
        # would spill
        SINGLE_R=r <= block_r and not fp32_fma(x.dtype, prec), BLOCK_R=block_r, PRECISION=prec,
    )


def _conv_backward(grad_y, x, a, b, z, has_bias, out_idx, stride, padding, dilation, needs, dx_out=None,
                   kind="conv"):
    """dx, dA, dB, db on 4-d tensors (see the module docstring for the kernels). grad_y, x and z are read as dense
    NHWC (converted once here if they are not), A in its kernel layout (r, kh, kw, C)."""
    need_x, need_a, need_b, need_bias = bool(needs[0]), bool(needs[1]), bool(needs[2]), bool(needs[3]) and has_bias
    n, c, h, w = x.shape
    r, _, kh, kw = a.shape
    o = b.shape[0]
    oh, ow = z.shape[2], z.shape[3]
    m = n * oh * ow
    dev, acc_t, prec = x.device, torch.float32, dot_precision(x.dtype, kind)
    b = b.contiguous()
    g = activations_channels_last(grad_y)
    _check_numel(x, g, z)
    idx = _active(out_idx, o)
    oa = o if idx is None else idx.numel()
    dx = da = dbw = dbias = None
    # G as (M, O) rows (a view of the NHWC tensor). With out_idx, its active columns are compacted once (one pass
    # over G) so that dZ and dB read 16-byte vectors instead of gathering 2-byte columns in their main loops (two
    # gathered passes read G's sectors twice anyway); rows padded to 16 columns with repeats of the first active
    # channel (never read: masked by OA), so that they stay 16-byte aligned.
    g_act, b_act, ldg = g.permute(0, 2, 3, 1).reshape(m, o), b, o
    if idx is not None and oa > 0 and m > 0:
        ldg = triton.cdiv(oa, 16) * 16
        cols = idx if ldg == oa else torch.cat([idx, idx[:1].expand(ldg - oa)])
        g_act, b_act = g_act.index_select(1, cols), b.index_select(0, idx)
        _check_numel(g_act)  # the dZ kernel's int32 offsets (its columns padded to 16 may outgrow G)

    if need_b or need_bias:
        dbw_act = torch.zeros(oa, r, dtype=acc_t, device=dev)
        dbias_act = torch.zeros(oa, dtype=acc_t, device=dev)
        # db on the tensor cores except with TF32 products, which would round G (see the db kernel's docstring)
        kernel_bias = need_bias and prec != "tf32"
        if oa > 0 and m > 0 and (need_b or kernel_bias):
            split = _split(triton.cdiv(oa, 64) * (triton.cdiv(r, 64) if need_b else 1), m, 256, dev)
            per = triton.cdiv(m, split)
            part_w = torch.empty(split, oa, r, dtype=acc_t, device=dev) if need_b else dbw_act
            part_b = torch.empty(split, oa, dtype=acc_t, device=dev) if kernel_bias else dbias_act
            grid = lambda meta: (triton.cdiv(oa, meta["BLOCK_O"]),  # noqa: E731
                                 triton.cdiv(r, meta["BLOCK_R"]) if need_b else 1, split)
            _sketch_conv2d_bwd_db_kernel[grid](
                g_act, activations_channels_last(z), part_w, part_b, m, r, oa, ldg, split, per,
                NEED_B=need_b, NEED_BIAS=kernel_bias, PRECISION=prec,
            )
            dbw_act = part_w.sum(0) if need_b else dbw_act
            dbias_act = part_b.sum(0) if kernel_bias else dbias_act
        if need_bias and not kernel_bias and oa > 0 and m > 0:
            dbias_act = g_act[:, :oa].sum(0, dtype=acc_t)
        if need_b:
            dbw = _scatter_rows(dbw_act.to(x.dtype), idx, o)
        if need_bias:
            dbias = _scatter_rows(dbias_act.to(x.dtype), idx, o)

    if need_x or need_a:
        ak = channels_inner(a)  # (r, kh, kw, C) memory, cached per weight version
        # dZ (M, r) position-major in x's dtype, as the torch path's dz (the 1x1 conv of G with B^T) is
        if oa == 0 or m == 0:
            dz = torch.zeros(m, r, dtype=x.dtype, device=dev)
        else:
            split = _split(triton.cdiv(m, 64) * triton.cdiv(r, 64), oa, 128, dev)
            # each split's share of O a multiple of 64 (16 under the interpreter, so that the tests' O = 37 still
            # splits), so that its bound keeps the channel loads 16-byte aligned
            align = 16 if interpreting() else 64
            per = triton.cdiv(triton.cdiv(oa, split), align) * align
            split = triton.cdiv(oa, per)
            dz = torch.empty(m, r, dtype=x.dtype, device=dev)
            out = torch.empty(split, m, r, dtype=acc_t, device=dev) if split > 1 else dz
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, meta["BLOCK_R"]), split)  # noqa: E731
            _sketch_conv2d_bwd_dz_kernel[grid](
                g_act, b_act, out, m, r, oa, ldg, split, per, PARTIAL=split > 1, PRECISION=prec,
            )
            if split > 1:
                dz.copy_(out.sum(0))
        if need_a:
            kk = c * kh * kw
            if m == 0:
                da = torch.zeros_like(a)
            else:
                tap_major = _tap_major(c)
                rows_k = kind == "conv" and rows_mode(c, dilation)
                c_pad = rows_channels(c) if rows_k else 1
                if rows_k:  # C < 16: the zero-padded frame, one row table of tap (0, 0) (ROWS, see the kernel)
                    xl = _rows_frame(x, None, padding, c_pad, zero_image=True)
                    _check_numel(xl)
                    sx = (xl.stride(0), xl.stride(1), xl.stride(2))
                    kk = kh * kw * c_pad
                else:
                    xl = activations_channels_last(x)
                    identity = kh == kw == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
                    rows = (_tap_rows(n, h, w, oh, ow, kh, kw, tuple(stride), tuple(padding), tuple(dilation), dev)
                            if tap_major and not identity else None)
                    sx = _dense_nhwc_strides(c, h, w)
                split = _split(triton.cdiv(r, 64) * triton.cdiv(kk, 64), m, 256, dev)
                per = triton.cdiv(m, split)
                if rows_k:  # shares of whole 128-position blocks; the table padded to split * per (see the kernel)
                    per = triton.cdiv(per, 128) * 128
                    split = triton.cdiv(m, per)
                    rows = _padded_rows(n, oh, ow, xl.shape[1], xl.shape[2], False, tuple(stride), split * per, dev)
                part = torch.empty(split, r, kk, dtype=acc_t, device=dev)

                def grid(meta):
                    k_tiles = (kh * kw * triton.cdiv(c, meta["BLOCK_K"]) if tap_major and not rows_k
                               else triton.cdiv(kk, meta["BLOCK_K"]))
                    return triton.cdiv(r, meta["BLOCK_R"]), k_tiles, split

                _sketch_conv2d_bwd_da_kernel[grid](
                    xl, dz, rows if rows is not None else dz, part, m, c, h, w, oh, ow, r, split, per, *sx,
                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                    KH=kh, KW=kw, TAP_MAJOR=tap_major, ROW_TABLE=rows is not None and not rows_k, PRECISION=prec,
                    ROWS=rows_k, C_PAD=c_pad,
                )
                # (r, kh, kw, C) -> A's (r, C, kh, kw); ROWS: (r, kh, kw, C_PAD), the padding channels dropped
                da = part.sum(0).view(r, kh, kw, c_pad if rows_k else c)[..., :c].permute(0, 3, 1, 2)
                da = da.to(x.dtype).contiguous()
        if need_x:
            dx = dx_out if dx_out is not None else empty_like_format(x, x.shape)
            mi = n * h * w
            if mi > 0:
                c_a = 0
                if c < 16:  # A's channels zero-padded to 16: vector loads of the dot's N side (see the kernel)
                    c_a = 16
                    ak = a.new_zeros(r, kh, kw, c_a)
                    ak[..., :c] = a.permute(0, 2, 3, 1)
                grid = lambda meta: (triton.cdiv(mi, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
                _sketch_conv2d_bwd_dx_kernel[grid](
                    dz, ak, dx, mi, c, h, w, oh, ow, r, *dx.stride(),
                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                    KH=kh, KW=kw, UNIT_STRIDE=tuple(stride) == (1, 1), PRECISION=prec, C_A=c_a,
                )
    return dx, da, dbw, dbias


def _scatter_rows(t_act: torch.Tensor, idx: torch.Tensor | None, o: int) -> torch.Tensor:
    if idx is None:
        return t_act
    return t_act.new_zeros((o, *t_act.shape[1:])).index_copy_(0, idx, t_act)


def sketch_conv2d_forward(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, z)`` with ``z = conv2d(x, A)`` (N, r, H', W') and ``y = conv2d(z, B[out_idx] as 1x1) + bias`` on the
    active channels, zero elsewhere (Kasiviswanathan et al., eq. 2), in one kernel; y and z in x's memory format."""
    _check_dtype("sketch_conv2d_forward", x)
    n, _, h, w = x.shape
    r, _, kh, kw = a.shape
    oh, ow = conv_out_hw(h, w, kh, kw, stride, padding, dilation)
    y = empty_like_format(x, (n, b.shape[0], oh, ow))
    z = empty_like_format(x, (n, r, oh, ow))
    _conv_forward(x, a, b, bias, out_idx, stride, padding, dilation, y, z)
    return y, z


def sketch_conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    z: torch.Tensor,
    has_bias: bool,
    out_idx: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs: tuple[bool, bool, bool, bool],
):
    """Gradients ``(dx, dA, dB, db)`` of :func:`sketch_conv2d_forward` (sec. 3.1): ``dZ = G B_act``,
    ``dB = G^T z`` and ``db = 1^T G`` on the active rows (zeros elsewhere), ``dA = dZ^T I_in``,
    ``dx = col2im(dZ A)``; ``None`` where ``needs`` is False (fixed sign matrices get no gradient)."""
    _check_dtype("sketch_conv2d_backward", x)
    return _conv_backward(grad_y, x, a, b, z, has_bias, out_idx, stride, padding, dilation, needs)


def sketch_linear_forward(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, z)`` with ``z = x A^T`` (..., r) and ``y = z B[out_idx]^T + bias`` (..., out), zero outside
    ``out_idx`` (SK-FC, Kasiviswanathan et al., eq. 4): the conv kernel with kh = kw = H = W = 1."""
    _check_dtype("sketch_linear_forward", x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r, o = a.shape[0], b.shape[0]
    y = torch.empty(x2.shape[0], o, dtype=x.dtype, device=x.device)
    z = torch.empty(x2.shape[0], r, dtype=x.dtype, device=x.device)
    _conv_forward(x2[:, :, None, None], a[:, :, None, None], b, bias, out_idx, (1, 1), (0, 0), (1, 1),
                  y[:, :, None, None], z[:, :, None, None], kind="linear")
    return y.view(*lead, o), z.view(*lead, r)


def sketch_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    z: torch.Tensor,
    has_bias: bool,
    out_idx: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool],
):
    """Gradients ``(dx, dA, dB, db)`` of :func:`sketch_linear_forward`: ``dZ = G B_act``, ``dx = dZ A``,
    ``dA = dZ^T x``, ``dB = G^T z`` and ``db = 1^T G`` on the active rows (sec. 3.2)."""
    _check_dtype("sketch_linear_backward", x)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    z2 = z.reshape(-1, z.shape[-1])
    dx2 = torch.empty_like(x2, memory_format=torch.contiguous_format) if needs[0] else None
    dx, da, db, dbias = _conv_backward(
        g2[:, :, None, None], x2[:, :, None, None], a[:, :, None, None], b, z2[:, :, None, None], has_bias, out_idx,
        (1, 1), (0, 0), (1, 1), needs, dx_out=None if dx2 is None else dx2[:, :, None, None], kind="linear",
    )
    if dx is not None:
        dx = dx2.view(x.shape)
    if da is not None:
        da = da.view(a.shape)
    return dx, da, db, dbias


__all__ = ["sketch_conv2d_backward", "sketch_conv2d_forward", "sketch_linear_backward", "sketch_linear_forward"]
