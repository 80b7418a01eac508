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
  loads anyway). G is thus read twice in the backward: dZ reduces over O and dB over M, and fusing both into one
  pass would need an atomic add of an O x r tile per position tile (about 10^8 atomics on a VGG layer).
- ``_sketch_conv2d_bwd_da_kernel``: dA, the only backward kernel that reads x (once).
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

from ._common import autotune_configs, dot_precision, interpreting, next_pow2

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
    """K tiles run over (tap, channel chunk) when the channels fill a tile: the x tile is then a position vector plus
    a channel vector (cheap addresses, coalesced in either layout). With few channels (AlexNet conv1: C = 3) a
    tap-major tile would be 13/16 padding, so K is flattened as in A.flatten(1) and gathered element-wise."""
    return c % 16 == 0 or c >= 64


# ---------------------------------------------------------------------------------------------------- helpers


@triton.jit
def _k_index(t, C, KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, TAP_MAJOR: tl.constexpr):
    """K tile ``t`` -> (channels, tap row i, tap col j, column offsets into A.flatten(1), mask)."""
    if TAP_MAJOR:
        ct = tl.cdiv(C, BLOCK_K)
        tap = t // ct
        c = (t - tap * ct) * BLOCK_K + tl.arange(0, BLOCK_K)
        i = tap // KW
        j = tap - i * KW
        koff = c * (KH * KW) + tap
        kmask = c < C
    else:
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        c = k // (KH * KW)
        i = (k // KW) % KH
        j = k % KW
        koff = k
        kmask = k < C * KH * KW
    return c, i, j, koff, kmask


@triton.jit
def _num_k_tiles(C, KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, TAP_MAJOR: tl.constexpr):
    if TAP_MAJOR:
        n = KH * KW * tl.cdiv(C, BLOCK_K)
    else:
        n = tl.cdiv(C * KH * KW, BLOCK_K)
    return n


@triton.jit
def _im2col_load(x_ptr, x_base, ih0, iw0, m_mask, c, i, j, kmask, H, W, sxc, sxh, sxw, dh, dw,
                 TAP_MAJOR: tl.constexpr):
    """The (BLOCK_M x BLOCK_K) tile of the im2col matrix: x[n, c, ih0 + i dh, iw0 + j dw], zero outside x."""
    if TAP_MAJOR:  # i, j scalars: the position part of the address is a vector
        ih = ih0 + i * dh
        iw = iw0 + j * dw
        ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = x_ptr + (x_base + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :]
        mask = ok[:, None] & kmask[None, :]
    else:
        ih = ih0[:, None] + (i * dh)[None, :]
        iw = iw0[:, None] + (j * dw)[None, :]
        mask = m_mask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = x_ptr + x_base[:, None] + (c * sxc)[None, :] + ih * sxh + iw * sxw
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _z_chunk(x_ptr, a_ptr, x_base, ih0, iw0, m_mask, r0, C, H, W, R, sxc, sxh, sxw, dh, dw,
             KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """z[m, r0:r0+BLOCK_R] = sum_k I_in[m, k] A[r, k] for the program's positions, in fp32."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    kk = C * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    num_k = _num_k_tiles(C, KH, KW, BLOCK_K, TAP_MAJOR)
    for t in range(0, num_k):
        c, i, j, koff, kmask = _k_index(t, C, KH, KW, BLOCK_K, TAP_MAJOR)
        xt = _im2col_load(x_ptr, x_base, ih0, iw0, m_mask, c, i, j, kmask, H, W, sxc, sxh, sxw, dh, dw, TAP_MAJOR)
        at = tl.load(a_ptr + offs_r[None, :] * kk + koff[:, None], mask=kmask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _positions(offs_m, OH, OW):
    """Output position m -> (n as int64, oh, ow); n in int64 so that n * stride_n cannot overflow."""
    n = offs_m // (OH * OW)
    rem = offs_m - n * (OH * OW)
    oh = rem // OW
    ow = rem - oh * OW
    return n.to(tl.int64), oh, ow


# ---------------------------------------------------------------------------------------------------- forward


def _fwd_cfg(bm, bk, bo, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_O": bo}, num_warps=warps, num_stages=stages)


# Standard implicit-GEMM tiles; 8 warps for BLOCK_M 128, where the z tile (up to 128 x 128 fp32) and the y tile are
# live together. Not yet measured on a GPU (no device lent to the session that wrote this): autotune chooses.
_FWD_CONFIGS = autotune_configs(
    [
        _fwd_cfg(128, 32, 64, 8, 3),
        _fwd_cfg(128, 64, 64, 8, 3),
        _fwd_cfg(64, 32, 64, 4, 3),
        _fwd_cfg(64, 64, 128, 4, 3),
        _fwd_cfg(64, 64, 64, 4, 4),
        _fwd_cfg(32, 64, 64, 4, 3),
    ],
    _fwd_cfg(32, 16, 16, 4, 1),
)


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "C", "R", "OC", "OA", "O_SPLIT", "KH", "KW", "SINGLE_R"])
@triton.jit
def _sketch_conv2d_fwd_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, perm_ptr, y_ptr, z_ptr,
    M, C, H, W, OH, OW, R, OC, OA, O_SPLIT,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw, szn, szc, szh, szw,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
    SINGLE_R: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """``z = conv2d(x, A)``, ``y[:, perm[:OA]] = z B[perm[:OA]]^T + bias``, ``y[:, perm[OA:]] = 0`` (eq. 2 / 4).

    ``perm``: the active channels first, then the inactive ones (identity without ``out_idx``).
    """
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n, oh, ow = _positions(offs_m, OH, OW)
    x_base = n * sxn
    ih0 = oh * sh - ph
    iw0 = ow * sw - pw
    y_pos = n * syn + oh * syh + ow * syw
    z_pos = n * szn + oh * szh + ow * szw
    out_ty = y_ptr.dtype.element_ty
    offs_rb = tl.arange(0, BLOCK_R)

    if SINGLE_R:
        z = _z_chunk(x_ptr, a_ptr, x_base, ih0, iw0, m_mask, 0, C, H, W, R, sxc, sxh, sxw, dh, dw,
                     KH, KW, TAP_MAJOR, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
        zc = z.to(out_ty)  # the backward and the torch path see z rounded to the input dtype: so does the 2nd GEMM
        r_mask = offs_rb < R
        tl.store(z_ptr + z_pos[:, None] + (offs_rb * szc)[None, :], zc,
                 mask=(offs_m < M - pid_o * M)[:, None] & r_mask[None, :])  # only the first program of an O split
    else:
        # Every program of an O split stores the same z rows (identical values): it reads them back itself below.
        for r0 in range(0, R, BLOCK_R):
            z = _z_chunk(x_ptr, a_ptr, x_base, ih0, iw0, m_mask, r0, C, H, W, R, sxc, sxh, sxw, dh, dw,
                         KH, KW, TAP_MAJOR, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
            offs_r = r0 + offs_rb
            tl.store(z_ptr + z_pos[:, None] + (offs_r * szc)[None, :], z.to(out_ty),
                     mask=m_mask[:, None] & (offs_r < R)[None, :])
        tl.debug_barrier()  # the z rows written by other threads of this program are read below

    for j0 in range(pid_o * BLOCK_O, OC, O_SPLIT * BLOCK_O):
        offs_j = j0 + tl.arange(0, BLOCK_O)
        j_mask = offs_j < OC
        if HAS_IDX:
            ch = tl.load(perm_ptr + offs_j, mask=j_mask, other=0)
        else:
            ch = offs_j
        active = j_mask & (offs_j < OA)
        if j0 < OA:
            if SINGLE_R:
                bt = tl.load(b_ptr + ch[None, :] * R + offs_rb[:, None], mask=active[None, :] & r_mask[:, None],
                             other=0.0)
                acc = tl.dot(zc, bt, input_precision=PRECISION, out_dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + offs_rb
                    rm = offs_r < R
                    zt = tl.load(z_ptr + z_pos[:, None] + (offs_r * szc)[None, :], mask=m_mask[:, None] & rm[None, :],
                                 other=0.0)
                    bt = tl.load(b_ptr + ch[None, :] * R + offs_r[:, None], mask=active[None, :] & rm[:, None],
                                 other=0.0)
                    acc = tl.dot(zt, bt, acc, input_precision=PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + ch, mask=active, other=0.0).to(tl.float32)[None, :]
            out = acc.to(out_ty)
        else:  # a chunk of inactive channels only: zeros, no GEMM
            out = tl.zeros((BLOCK_M, BLOCK_O), dtype=out_ty)
        tl.store(y_ptr + y_pos[:, None] + (ch * syc)[None, :], out, mask=m_mask[:, None] & j_mask[None, :])


# ---------------------------------------------------------------------------------------------------- backward


def _dz_cfg(bm, bo, br, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_O": bo, "BLOCK_R": br}, num_warps=warps, num_stages=stages)


_DZ_CONFIGS = autotune_configs(
    [_dz_cfg(128, 64, 64, 4, 3), _dz_cfg(128, 32, 128, 8, 3), _dz_cfg(64, 64, 64, 4, 4), _dz_cfg(64, 64, 32, 4, 3),
     _dz_cfg(32, 128, 64, 4, 3)],
    _dz_cfg(32, 16, 16, 4, 1),
)


@triton.autotune(configs=_DZ_CONFIGS, key=["M", "R", "OA", "SPLIT"])
@triton.jit
def _sketch_conv2d_bwd_dz_kernel(
    g_ptr, b_ptr, idx_ptr, dz_ptr,
    M, OH, OW, R, OA, SPLIT, o_per_split,
    sgn, sgc, sgh, sgw,
    HAS_IDX: tl.constexpr, PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dZ[m, r] = sum_{o in out_idx} G[m, o] B[o, r]`` over this split's share of the active channels; dZ is
    (M, r) row-major (position-major: the dA and dX kernels read r-contiguous rows). ``PARTIAL``: fp32 partial sums
    at ``dz_ptr + split * M * R``."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n, oh, ow = _positions(offs_m, OH, OW)
    g_pos = n * sgn + oh * sgh + ow * sgw
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    j_start = pid_s * o_per_split
    j_end = tl.minimum(j_start + o_per_split, OA)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_O):
        offs_j = j0 + tl.arange(0, BLOCK_O)
        j_mask = offs_j < j_end
        if HAS_IDX:
            ch = tl.load(idx_ptr + offs_j, mask=j_mask, other=0)
        else:
            ch = offs_j
        gt = tl.load(g_ptr + g_pos[:, None] + (ch * sgc)[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + ch[:, None] * R + offs_r[None, :], mask=j_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(gt.to(bt.dtype), bt, acc, input_precision=PRECISION)
    ptrs = dz_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    mask = m_mask[:, None] & r_mask[None, :]
    if PARTIAL:
        tl.store(ptrs + pid_s.to(tl.int64) * M * R, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(dz_ptr.dtype.element_ty), mask=mask)


def _db_cfg(bo, br, bm, warps, stages):
    return triton.Config({"BLOCK_O": bo, "BLOCK_R": br, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


_DB_CONFIGS = autotune_configs(
    [_db_cfg(64, 64, 64, 4, 3), _db_cfg(128, 64, 32, 4, 3), _db_cfg(64, 128, 32, 4, 3), _db_cfg(128, 128, 32, 8, 3),
     _db_cfg(64, 32, 128, 4, 3)],
    _db_cfg(16, 16, 32, 4, 1),
)


@triton.autotune(configs=_DB_CONFIGS, key=["M", "R", "OA", "SPLIT", "NEED_B", "NEED_BIAS"])
@triton.jit
def _sketch_conv2d_bwd_db_kernel(
    g_ptr, z_ptr, idx_ptr, dbw_ptr, dbias_ptr,
    M, OH, OW, R, OA, SPLIT, m_per_split,
    sgn, sgc, sgh, sgw, szn, szc, szh, szw,
    HAS_IDX: tl.constexpr, NEED_B: tl.constexpr, NEED_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial sums over this split's positions of ``dB_act = G_act^T z`` (OA x r) and ``db_act = 1^T G_act``,
    written (fp32) at ``[split]`` of (SPLIT, OA, R) and (SPLIT, OA)."""
    pid_j = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_j = pid_j * BLOCK_O + tl.arange(0, BLOCK_O)
    j_mask = offs_j < OA
    if HAS_IDX:
        ch = tl.load(idx_ptr + offs_j, mask=j_mask, other=0)
    else:
        ch = offs_j
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    m_start = pid_s * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        n, oh, ow = _positions(offs_m, OH, OW)
        g_pos = n * sgn + oh * sgh + ow * sgw
        gt = tl.load(g_ptr + (ch * sgc)[:, None] + g_pos[None, :], mask=j_mask[:, None] & m_mask[None, :], other=0.0)
        if NEED_B:
            z_pos = n * szn + oh * szh + ow * szw
            zt = tl.load(z_ptr + z_pos[:, None] + (offs_r * szc)[None, :], mask=m_mask[:, None] & r_mask[None, :],
                         other=0.0)
            acc = tl.dot(gt.to(zt.dtype), zt, acc, input_precision=PRECISION)
        if NEED_BIAS:
            bsum += tl.sum(gt.to(tl.float32), axis=1)
    if NEED_B:
        ptrs = dbw_ptr + pid_s * OA * R + offs_j[:, None] * R + offs_r[None, :]
        tl.store(ptrs, acc, mask=j_mask[:, None] & r_mask[None, :])
    if NEED_BIAS:
        # db once, by r tile 0; written as a vector condition because the interpreter rejects `j_mask & (pid_r == 0)`
        tl.store(dbias_ptr + pid_s * OA + offs_j, bsum, mask=j_mask & (offs_j < OA - pid_r * OA))


def _da_cfg(br, bk, bm, warps, stages):
    return triton.Config({"BLOCK_R": br, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


_DA_CONFIGS = autotune_configs(
    [_da_cfg(64, 64, 64, 4, 3), _da_cfg(128, 64, 32, 8, 3), _da_cfg(64, 128, 32, 4, 3), _da_cfg(32, 64, 128, 4, 3),
     _da_cfg(128, 128, 32, 8, 3)],
    _da_cfg(16, 16, 32, 4, 1),
)


@triton.autotune(configs=_DA_CONFIGS, key=["M", "C", "R", "SPLIT", "KH", "KW"])
@triton.jit
def _sketch_conv2d_bwd_da_kernel(
    x_ptr, dz_ptr, da_ptr,
    M, C, H, W, OH, OW, R, SPLIT, m_per_split,
    sxn, sxc, sxh, sxw, sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial ``dA[r, k] = sum_m dZ[m, r] I_in[m, k]`` over this split's positions (the conv weight gradient of
    (x, dZ) as an implicit GEMM), fp32 at ``[split]`` of (SPLIT, R, C kh kw)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    c, i, j, koff, kmask = _k_index(pid_k, C, KH, KW, BLOCK_K, TAP_MAJOR)
    m_start = pid_s * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        n, oh, ow = _positions(offs_m, OH, OW)
        xt = _im2col_load(x_ptr, n * sxn, oh * sh - ph, ow * sw - pw, m_mask, c, i, j, kmask, H, W, sxc, sxh, sxw,
                          dh, dw, TAP_MAJOR)
        dzt = tl.load(dz_ptr + offs_r[:, None] + offs_m.to(tl.int64)[None, :] * R,
                      mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(dzt, xt, acc, input_precision=PRECISION)
    kk = C * KH * KW
    ptrs = da_ptr + pid_s * R * kk + offs_r[:, None] * kk + koff[None, :]
    tl.store(ptrs, acc, mask=r_mask[:, None] & kmask[None, :])


def _dx_cfg(bm, bc, br, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_R": br}, num_warps=warps, num_stages=stages)


_DX_CONFIGS = autotune_configs(
    [_dx_cfg(128, 64, 32, 4, 3), _dx_cfg(128, 128, 32, 8, 3), _dx_cfg(64, 64, 64, 4, 3), _dx_cfg(64, 128, 64, 4, 3),
     _dx_cfg(128, 32, 64, 4, 4)],
    _dx_cfg(32, 16, 16, 4, 1),
)


@triton.autotune(configs=_DX_CONFIGS, key=["MI", "C", "R", "KH", "KW"])
@triton.jit
def _sketch_conv2d_bwd_dx_kernel(
    dz_ptr, a_ptr, dx_ptr,
    MI, C, H, W, OH, OW, R,
    sdn, sdc, sdh, sdw, sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dX[n, c, ih, iw] = sum_{i, j, r} dZ[n, oh, ow, r] A[r, c, i, j]`` over the taps with
    ``ih = oh s_h - p_h + i d_h`` (same for w): the transposed conv, gathered per input position."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = offs_p < MI
    n, ih, iw = _positions(offs_p, H, W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    kk = C * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in range(0, KH * KW):
        i = tap // KW
        j = tap - i * KW
        th = ih + ph - i * dh
        tw = iw + pw - j * dw
        thc = tl.maximum(th, 0)  # // and % of negative ints differ between C and Python: keep them >= 0
        twc = tl.maximum(tw, 0)
        oh = thc // sh
        ow = twc // sw
        ok = p_mask & (th >= 0) & (tw >= 0) & (oh * sh == thc) & (ow * sw == twc) & (oh < OH) & (ow < OW)
        m = (n * OH + oh) * OW + ow
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            dzt = tl.load(dz_ptr + m[:, None] * R + offs_r[None, :], mask=ok[:, None] & r_mask[None, :], other=0.0)
            at = tl.load(a_ptr + offs_r[:, None] * kk + (offs_c * (KH * KW) + tap)[None, :],
                         mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            acc = tl.dot(dzt, at, acc, input_precision=PRECISION)
    ptrs = dx_ptr + (n * sdn + ih * sdh + iw * sdw)[:, None] + (offs_c * sdc)[None, :]
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------------------------------- launchers


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"tritonslide.kernels.sketch.{name}: unsupported dtype {x.dtype} (fp16, bf16, fp32)")


def _out_hw(h, w, kh, kw, stride, padding, dilation):
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def _active(out_idx: torch.Tensor | None, o: int) -> torch.Tensor | None:
    """``None`` when every channel is active (as the torch fallback treats a full index set)."""
    return None if out_idx is None or out_idx.numel() == o else out_idx


def _like_x(x: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor in x's memory format (F.conv2d's outputs follow ``suggest_memory_format``)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _conv_forward(x, a, b, bias, out_idx, stride, padding, dilation, y, z):
    """Runs the forward kernel on 4-d x (N, C, H, W), writing y (N, O, OH, OW) and z (N, r, OH, OW)."""
    n, c, h, w = x.shape
    r, _, kh, kw = a.shape
    o = b.shape[0]
    oh, ow = y.shape[2], y.shape[3]
    m = n * oh * ow
    if m == 0:
        return
    a, b = a.contiguous(), b.contiguous()
    idx = _active(out_idx, o)
    oa = o if idx is None else idx.numel()
    perm = None
    if idx is not None:  # the active channels first, then the inactive ones; no host sync
        inactive = torch.ones(o, dtype=torch.int32, device=x.device)
        inactive[idx] = 0
        perm = torch.argsort(inactive, stable=True)
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
        *x.stride(), *y.stride(), *z.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, TAP_MAJOR=_tap_major(c), HAS_BIAS=bias is not None, HAS_IDX=perm is not None,
        SINGLE_R=r <= block_r, BLOCK_R=block_r, PRECISION=dot_precision(x.dtype),
    )


def _conv_backward(grad_y, x, a, b, z, has_bias, out_idx, stride, padding, dilation, needs, dx_out=None):
    """dx, dA, dB, db on 4-d tensors (see the module docstring for the kernels)."""
    need_x, need_a, need_b, need_bias = bool(needs[0]), bool(needs[1]), bool(needs[2]), bool(needs[3]) and has_bias
    n, c, h, w = x.shape
    r, _, kh, kw = a.shape
    o = b.shape[0]
    oh, ow = z.shape[2], z.shape[3]
    m = n * oh * ow
    dev, acc_t, prec = x.device, torch.float32, dot_precision(x.dtype)
    a, b = a.contiguous(), b.contiguous()
    idx = _active(out_idx, o)
    oa = o if idx is None else idx.numel()
    idx_arg = idx if idx is not None else b
    dx = da = dbw = dbias = None

    if need_b or need_bias:
        dbw_act = torch.zeros(oa, r, dtype=acc_t, device=dev)
        dbias_act = torch.zeros(oa, dtype=acc_t, device=dev)
        if oa > 0 and m > 0:
            split = _split(triton.cdiv(oa, 64) * (triton.cdiv(r, 64) if need_b else 1), m, 256, dev)
            per = triton.cdiv(m, split)
            part_w = torch.empty(split, oa, r, dtype=acc_t, device=dev) if need_b else dbw_act
            part_b = torch.empty(split, oa, dtype=acc_t, device=dev) if need_bias else dbias_act
            grid = lambda meta: (triton.cdiv(oa, meta["BLOCK_O"]),  # noqa: E731
                                 triton.cdiv(r, meta["BLOCK_R"]) if need_b else 1, split)
            _sketch_conv2d_bwd_db_kernel[grid](
                grad_y, z, idx_arg, part_w, part_b, m, oh, ow, r, oa, split, per,
                *grad_y.stride(), *z.stride(),
                HAS_IDX=idx is not None, NEED_B=need_b, NEED_BIAS=need_bias, PRECISION=prec,
            )
            dbw_act = part_w.sum(0) if need_b else dbw_act
            dbias_act = part_b.sum(0) if need_bias else dbias_act
        if need_b:
            dbw = _scatter_rows(dbw_act.to(x.dtype), idx, o)
        if need_bias:
            dbias = _scatter_rows(dbias_act.to(x.dtype), idx, o)

    if need_x or need_a:
        # dZ (M, r) position-major in x's dtype, as the torch path's dz (the 1x1 conv of G with B^T) is
        if oa == 0 or m == 0:
            dz = torch.zeros(m, r, dtype=x.dtype, device=dev)
        else:
            split = _split(triton.cdiv(m, 64) * triton.cdiv(r, 64), oa, 128, dev)
            per = triton.cdiv(oa, split)
            dz = torch.empty(m, r, dtype=x.dtype, device=dev)
            out = torch.empty(split, m, r, dtype=acc_t, device=dev) if split > 1 else dz
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, meta["BLOCK_R"]), split)  # noqa: E731
            _sketch_conv2d_bwd_dz_kernel[grid](
                grad_y, b, idx_arg, out, m, oh, ow, r, oa, split, per, *grad_y.stride(),
                HAS_IDX=idx is not None, PARTIAL=split > 1, PRECISION=prec,
            )
            if split > 1:
                dz.copy_(out.sum(0))
        if need_a:
            kk = c * kh * kw
            if m == 0:
                da = torch.zeros_like(a)
            else:
                tap_major = _tap_major(c)
                split = _split(triton.cdiv(r, 64) * triton.cdiv(kk, 64), m, 256, dev)
                per = triton.cdiv(m, split)
                part = torch.empty(split, r, kk, dtype=acc_t, device=dev)

                def grid(meta):
                    k_tiles = (kh * kw * triton.cdiv(c, meta["BLOCK_K"]) if tap_major
                               else triton.cdiv(kk, meta["BLOCK_K"]))
                    return triton.cdiv(r, meta["BLOCK_R"]), k_tiles, split

                _sketch_conv2d_bwd_da_kernel[grid](
                    x, dz, part, m, c, h, w, oh, ow, r, split, per, *x.stride(),
                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                    KH=kh, KW=kw, TAP_MAJOR=tap_major, PRECISION=prec,
                )
                da = part.sum(0).view(a.shape).to(x.dtype)
        if need_x:
            dx = dx_out if dx_out is not None else _like_x(x, x.shape)
            mi = n * h * w
            if mi > 0:
                grid = lambda meta: (triton.cdiv(mi, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
                _sketch_conv2d_bwd_dx_kernel[grid](
                    dz, a, dx, mi, c, h, w, oh, ow, r, *dx.stride(),
                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                    KH=kh, KW=kw, PRECISION=prec,
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
    oh, ow = _out_hw(h, w, kh, kw, stride, padding, dilation)
    y = _like_x(x, (n, b.shape[0], oh, ow))
    z = _like_x(x, (n, r, oh, ow))
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
                  y[:, :, None, None], z[:, :, None, None])
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
        (1, 1), (0, 0), (1, 1), needs, dx_out=None if dx2 is None else dx2[:, :, None, None],
    )
    if dx is not None:
        dx = dx2.view(x.shape)
    if da is not None:
        da = da.view(a.shape)
    return dx, da, db, dbias


__all__ = ["sketch_conv2d_backward", "sketch_conv2d_forward", "sketch_linear_backward", "sketch_linear_forward"]
