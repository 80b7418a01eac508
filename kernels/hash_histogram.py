"""Fused hyperplane hashing of every input patch and the per-table bucket histogram, in one Triton pass.

Feeney (2019), shared/papers/001, sec. 3.2.5 and 5.1: bit ``j`` of table ``t`` of a patch ``p`` is
``[<a_{t,j}, p> >= 0]`` (eq. 3.3), the table's code is ``g(p) = sum_j bit_j << j`` (eq. 3.4), and the query
histogram counts the codes of every patch of the batch (the "mode" selection of sec. 4.2). The unfused torch
pipeline (``tritonslide.cpu_fallback.torch_hash_histogram``) is a convolution with the planes as filters, a
sign, a bit packing and a bincount: four passes and an (N, L*K, H', W') intermediate. Here one program takes
``BLOCK_M`` output positions and

1. projects their patches on all ``L*K`` planes with an implicit-im2col GEMM (``tl.dot`` over the reduction
   ``C_read * kh * kw``, accumulated in fp32; the patch matrix is never written to memory; with ``in_idx`` only
   those channels are read),
2. packs the signs into one K-bit code per table in registers (optionally storing the codes),
3. counts its codes per table, then adds them to the global histogram: a per-program histogram
   (``tl.histogram``) and one atomic add per non-empty bucket when ``2**K`` is small, one atomic add per
   position otherwise (a per-program table of ``2**K`` counters stops fitting in registers).

Projections use the planes rounded to ``x``'s dtype (the layers keep their planes in their own dtype, so this
is a no-op for them) and fp32 accumulation; fp32 inputs use IEEE fp32 products unless torch allows TF32 matmuls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, dot_precision, next_pow2

# Largest bucket count for which a per-program histogram is kept in registers (tl.histogram of BLOCK_M codes
# into 2**K bins). Above it every position does one global atomic add instead. Not yet tuned on a GPU: 1024
# bins are 4 KiB of int32 per table, the size below which Triton keeps such a tensor in registers/shared memory.
LOCAL_HIST_MAX_BUCKETS = 1024

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bm, bd, w, s in (
        (64, 32, 4, 3),
        (128, 32, 4, 3),
        (128, 64, 4, 3),
        (128, 32, 8, 4),
        (256, 32, 8, 3),
        (256, 64, 8, 3),
        (64, 64, 4, 4),
        (128, 16, 4, 4),
    )
]
# Under the interpreter every program is a numpy loop: large blocks mean fewer of them.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1)


@triton.autotune(
    configs=autotune_configs(_CONFIGS, _INTERPRETER_CONFIG),
    key=["M", "D", "P", "N_BUCKETS", "CHANNELS_INNER", "KH", "KW"],
    reset_to_zero=["hist_ptr"],  # autotuning runs the kernel once per config: the atomics must start from zero
)
@triton.jit
def _hash_histogram_fwd_kernel(
    x_ptr, planes_ptr, in_idx_ptr, hist_ptr, codes_ptr,
    M, D, P, C_READ, H, W, HO, WO,
    sxn, sxc, sxh, sxw,
    spp, spc, sph, spw,
    scn, sct, sch, scw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, BITS: tl.constexpr, TABLES: tl.constexpr, N_BUCKETS: tl.constexpr,
    BLOCK_P: tl.constexpr, HAS_IN_IDX: tl.constexpr, WRITE_CODES: tl.constexpr, LOCAL_HIST: tl.constexpr,
    CHANNELS_INNER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % WO
    oh = (offs_m // WO) % HO
    n = (offs_m // (WO * HO)).to(tl.int64)  # int64: n * sxn passes 2**31 on large batches
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + n * sxn  # (BLOCK_M,) pointers to the sample of each position

    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        # Reduction order: channels innermost for channels_last inputs (contiguous channel loads), taps innermost
        # for NCHW (consecutive output columns then read consecutive addresses).
        if CHANNELS_INNER:
            c_loc = offs_d % C_READ
            tap = offs_d // C_READ
        else:
            c_loc = offs_d // (KH * KW)
            tap = offs_d % (KH * KW)
        r = tap // KW
        s = tap % KW
        if HAS_IN_IDX:
            c = tl.load(in_idx_ptr + c_loc, mask=d_ok, other=0)
        else:
            c = c_loc
        ih = ih0[:, None] + (r * dil_h)[None, :]
        iw = iw0[:, None] + (s * dil_w)[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(
            x_row[:, None] + c[None, :] * sxc + ih * sxh + iw * sxw,
            mask=m_ok[:, None] & d_ok[None, :] & inside, other=0.0,
        )
        b = tl.load(
            planes_ptr + offs_p[None, :] * spp + (c * spc + r * sph + s * spw)[:, None],
            mask=d_ok[:, None] & p_ok[None, :], other=0.0,
        )
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)

    # Epilogue: sign bits -> one code per table. Column p is bit p % BITS of table p // BITS.
    bit = (acc >= 0).to(tl.int32)
    weight = tl.where(p_ok, 1 << (offs_p % BITS), 0)
    table_of = offs_p // BITS
    n_invalid = BLOCK_M - tl.sum(m_ok.to(tl.int32), axis=0)
    for t in tl.static_range(TABLES):
        code = tl.sum(tl.where((table_of == t)[None, :], bit * weight[None, :], 0), axis=1)
        if WRITE_CODES:
            dst = codes_ptr + n * scn + t * sct + oh * sch + ow * scw
            tl.store(dst, code.to(tl.int64), mask=m_ok)
        if LOCAL_HIST:
            # Positions past M are counted in bucket 0 by tl.histogram (their code is forced to 0), then removed.
            buckets = tl.arange(0, N_BUCKETS)
            local = tl.histogram(tl.where(m_ok, code, 0), N_BUCKETS)
            local = local - tl.where(buckets == 0, n_invalid, 0)
            tl.atomic_add(hist_ptr + t * N_BUCKETS + buckets, local, mask=local > 0, sem="relaxed")
        else:
            ones = tl.full((BLOCK_M,), 1, dtype=tl.int32)
            tl.atomic_add(hist_ptr + t * N_BUCKETS + code, ones, mask=m_ok, sem="relaxed")


def _out_hw(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def hash_histogram_forward(
    x: torch.Tensor,
    planes: torch.Tensor,
    bits: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    in_idx: torch.Tensor | None = None,
    return_codes: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launcher of :func:`_hash_histogram_fwd_kernel`; the same contract as ``torch_hash_histogram``.

    Returns the (L, 2**bits) int64 histogram, and the (N, L, H', W') int64 codes when ``return_codes``.
    Arguments are checked by ``tritonslide.ops.hash_histogram``; ``x`` may be NCHW or channels_last.
    """
    n, c, h, w = x.shape
    n_planes, _, kh, kw = planes.shape
    n_tables = n_planes // bits
    ho = _out_hw(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_hw(w, kw, stride[1], padding[1], dilation[1])
    m = n * ho * wo
    if m >= 2**31:  # the histogram counters are int32
        raise ValueError(f"tritonslide.ops.hash_histogram: {m} patches exceed the kernel's int32 counters")
    c_read = c if in_idx is None else in_idx.numel()
    n_buckets = 1 << bits
    hist = torch.zeros(n_tables, n_buckets, dtype=torch.int32, device=x.device)
    codes = None
    if return_codes:
        codes = torch.empty(n, n_tables, ho, wo, dtype=torch.int64, device=x.device)
    if m == 0 or c_read == 0:
        # Empty batch: no patches. No channels read: every projection is 0, so every code is all ones (0 >= 0).
        if c_read == 0 and m > 0:
            hist[:, n_buckets - 1] = m
            if codes is not None:
                codes.fill_(n_buckets - 1)
        hist = hist.to(torch.int64)
        return (hist, codes) if return_codes else hist
    planes = planes.to(x.dtype)
    channels_inner = x.dim() == 4 and c > 1 and x.stride(1) == 1
    codes_arg = codes if codes is not None else hist  # never written when WRITE_CODES is False
    code_strides = codes.stride() if codes is not None else (0, 0, 0, 0)
    in_idx_arg = in_idx if in_idx is not None else hist
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _hash_histogram_fwd_kernel[grid](
        x, planes, in_idx_arg, hist, codes_arg,
        m, c_read * kh * kw, n_planes, c_read, h, w, ho, wo,
        *x.stride(), *planes.stride(), *code_strides,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, BITS=bits, TABLES=n_tables, N_BUCKETS=n_buckets,
        BLOCK_P=next_pow2(n_planes), HAS_IN_IDX=in_idx is not None, WRITE_CODES=codes is not None,
        LOCAL_HIST=n_buckets <= LOCAL_HIST_MAX_BUCKETS, CHANNELS_INNER=channels_inner,
        PRECISION=dot_precision(x.dtype),
    )
    hist = hist.to(torch.int64)
    return (hist, codes) if return_codes else hist
