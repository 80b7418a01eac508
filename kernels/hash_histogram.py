"""Fused hyperplane hashing of every input patch and the per-table bucket histogram, in one Triton pass.

Feeney (2019), shared/papers/001, sec. 3.2.5 and 5.1: bit ``j`` of table ``t`` of a patch ``p`` is
``[<a_{t,j}, p> >= 0]`` (eq. 3.3), the table's code is ``g(p) = sum_j bit_j << j`` (eq. 3.4), and the query
histogram counts the codes of every patch of the batch (the "mode" selection of sec. 4.2). The unfused torch
pipeline (``tritonslide.cpu_fallback.torch_hash_histogram``) is a convolution with the planes as filters, a
sign, a bit packing and a bincount: four passes and an (N, L*K, H', W') intermediate. Here one program takes
``BLOCK_M`` output positions and

1. projects their patches on all ``L*K`` planes with an implicit-im2col GEMM (``tl.dot``, fp32 accumulation; the
   patch matrix is never written to memory; with ``in_idx`` only those channels, gathered by the launcher into a
   compact copy, are read),
2. packs the signs of all planes into one word per position (one row reduction), and slices one K-bit code per
   table out of it (optionally storing the codes),
3. counts its codes per table, then adds them to the global histogram: a per-program histogram
   (``tl.histogram``) and one atomic add per non-empty bucket when ``2**K`` is small, one atomic add per
   position otherwise (a per-program table of ``2**K`` counters stops fitting in registers). With ``per_sample``
   (issue #15: an active set per sample) each image has its own (L, 2**K) histogram: a tile inside one image adds
   its per-program histogram there, a tile spanning images (tap-major order, maps smaller than a tile) adds one
   count per position into its position's image.

Layout (issue #12): activations are read channels_last (NHWC; the launcher converts an NCHW input once) and the
planes with channels innermost, so the reduction axis is contiguous in both operands and the operands arrive by
cp.async (LDGSTS) in 16-byte vectors (8-byte for fp16 / bf16 rows of 4 padded channels). The reduction runs in one
of two orders, chosen by the launcher:

- tap-major (C >= 16, or dilated columns): the reduction index is d = tap * C + c, the NHWC order of a
  patch, walked in ``BLOCK_D`` chunks by one software-pipelined loop (a chunk may span taps when C < BLOCK_D). The
  padding mask of all kh*kw taps is computed once per tile as a bitmask per position (KH + KW range tests); a chunk
  column tests its tap's bit. C is a compile-time constant (``C_CONST``): the split of a column into (tap, channel)
  costs a few instructions per column, shared by every row. With ``in_idx`` the launcher first gathers the active
  channels into a compact NHWC copy (zero-padded to a multiple of 16 channels), which the kernel reads like any input.
- ``ROWS`` (C < 16, e.g. RGB input): the launcher makes one zero-padded NHWC copy with C padded to ``C_PAD`` (a
  power of two >= 4) and the convolution's padding built in, so the loads carry no mask at all; in NHWC the kw taps
  of a kernel row are kw * C_PAD consecutive elements, and the reduction d = r * kw * C_PAD + j streams them.
  AlexNet's conv1 (C = 3, 11x11) reduces over 11 * 44 elements instead of 121 taps of 3 channels; its tiles stay
  inside one image, so the image index is a scalar per program.

Only the last, partial chunk of a reduction is masked (peeled out of the loop): no element outside a patch is ever
multiplied in, so a non-finite pixel changes only the codes of the patches that contain it, as in the reference.
Output sizes, strides and kh, kw, C are compile-time constants (divisions by constants in the per-row address
arithmetic), as conv layers keep one geometry.

Projections use the planes rounded to ``x``'s dtype (the layers keep their planes in their own dtype, so this
is a no-op for them) and fp32 accumulation; fp32 inputs use TF32 products exactly when cuDNN convolutions would
(``dot_precision``).
"""

from __future__ import annotations

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
    next_pow2,
    take_channels,
)
from ._gemm import four_byte

# Largest bucket count for which a per-program histogram is kept in registers (tl.histogram of BLOCK_M codes
# into 2**K bins). Above it every position does one global atomic add instead. Not yet tuned on a GPU: 1024
# bins are 4 KiB of int32 per table, the size below which Triton keeps such a tensor in registers/shared memory.
LOCAL_HIST_MAX_BUCKETS = 1024

# Channels below which the row-segment order (ROWS) is used: a tap of fewer than 16 channels cannot fill one
# 16-deep tl.dot step on its own.
ROWS_MAX_CHANNELS = 16

# BLOCK_M x BLOCK_D tiles (BLOCK_P = 16 planes: L*K = 15 by default). The hash GEMM has only 16 columns, so the
# loop is bound by instruction issue (address, mask, cp.async, wgmma descriptors, barriers), not by the MMAs: many
# rows per warp amortize the per-iteration and per-tile work. AOT report (bench/aot.py, hash_issue_model, fp16,
# sm_90, an estimate): 512x32 with 4 warps issues 0.53 / 0.66 / 0.60 warp-instructions per input element on the
# VGG-11 / ResNet-18 / AlexNet conv1 layers, 128x64 with 4 warps 0.79 / 1.04 / 0.96, 64x64 1.10 / 0.79 / 1.37.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bm, bd, w, s in (
        (512, 32, 4, 2),
        (256, 32, 4, 2),
        (512, 64, 8, 2),
        (128, 128, 4, 2),
        (128, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
    )
]
# Under the interpreter every program is a numpy loop: large blocks mean fewer of them.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_D": 16}, num_warps=4, num_stages=1)


def _chunk_len(a: dict) -> int:
    """Elements of the flattened reduction the chunks walk."""
    if a["ROWS"]:
        return a["KH"] * a["KW"] * a["C_PAD"]
    return a["KH"] * a["KW"] * a["C_CONST"]


def _prune_configs(configs, nargs, **kwargs):
    """Drop BLOCK_D wider than the reduction chunk (rounded up to a power of two >= 16): the extra columns would be
    masked loads and zero MMAs. With 4-byte inputs, drop tiles that spill (AOT report, Triton 3.9, sm_80/sm_90):
    more than 64 rows per warp (512/32 w4: 8 B on sm_80 with TF32; the same without a per-program histogram), and with
    IEEE fp32 products (FFMA, operands in
    registers) more than 1024 tile elements per warp (128/64 w4: 136 B, 256/64 w4: 392 B on sm_80)."""
    a = {**nargs, **kwargs}
    limit = next_pow2(_chunk_len(a))
    four_bytes = four_byte(a, "x_ptr")

    def fits(c):
        bm, bd, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.num_warps
        if bd > limit:
            return False
        if (four_bytes or not a["LOCAL_HIST"]) and bm // w > 64:
            return False  # per-position atomics (2**K > 1024): 512/32 w4 spills 384 B
        return not (four_bytes and a["PRECISION"] == "ieee" and bm * bd // w > 1024)

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_D"] // c.num_warps)]


@tuned(
    configs=autotune_configs(_CONFIGS, _INTERPRETER_CONFIG),
    key=["M", "C_READ", "P", "N_BUCKETS", "KH", "KW", "SH", "HO", "WO", "ROWS", "PRECISION", "PER_SAMPLE"],
    prune_configs_by={"early_config_prune": _prune_configs},
    buckets=["C_READ"],
    reset_to_zero=["hist_ptr"],  # autotuning runs the kernel once per config: the atomics must start from zero
)
@triton.jit
def _hash_histogram_fwd_kernel(
    x_ptr, planes_ptr, hist_ptr, codes_ptr,
    M, P, C_READ, H, W,
    sxn, sxh, sxw,
    spp, sph, spw,
    scn, sct,
    pad_h, pad_w, dil_w,
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BITS: tl.constexpr, TABLES: tl.constexpr, N_BUCKETS: tl.constexpr, BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr, C_PAD: tl.constexpr, C_CONST: tl.constexpr,
    WRITE_CODES: tl.constexpr, LOCAL_HIST: tl.constexpr, PRECISION: tl.constexpr, PER_SAMPLE: tl.constexpr,
    HO: tl.constexpr, WO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # x: (N, H, W, C) with unit channel stride (sxc == 1); planes: (P, KH, KW, C) with unit channel stride.
    pid = tl.program_id(0)
    # HO, WO are constexpr: the position decomposition below is done for every row a thread loads (16 rows of a
    # 128 x 128 tile per thread), and a division by a runtime value is ~25 SASS instructions, by a constant 3.
    hw: tl.constexpr = HO * WO
    if ROWS:
        # Tiles never straddle two images: the image index is one scalar per program, not a division per row.
        TPI: tl.constexpr = (hw + BLOCK_M - 1) // BLOCK_M
        n = pid // TPI
        sp = (pid - n * TPI) * BLOCK_M + tl.arange(0, BLOCK_M)  # oh * WO + ow: the codes' spatial offset
        m_ok = sp < hw
        n = n.to(tl.int64)
    else:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        n = (offs_m.to(tl.uint32) // hw).to(tl.int32)  # unsigned: a division by a constant without sign fix-ups
        sp = offs_m - n * hw
        oh = (sp.to(tl.uint32) // WO).to(tl.int32)
        ow = sp - oh * WO
        ih0 = oh * SH - pad_h
        iw0 = ow * SW - pad_w
        n = n.to(tl.int64)  # int64: n * sxn passes 2**31 on large batches

    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    if ROWS:
        # x is the launcher's zero-padded (N, Hp, Wp, C_PAD) copy: patch (oh, ow) starts at pixel (oh*SH, ow*SW)
        # and every read is in bounds, so the loads carry no spatial mask. The reduction is flattened over
        # d = r * ROW + j (kernel row r, j in the row segment of KW pixels x C_PAD channels, contiguous in NHWC):
        # the chunks stream whole row segments back to back, and only the last, partial chunk is masked.
        ROW: tl.constexpr = KW * C_PAD
        D_TOT: tl.constexpr = KH * ROW
        FULL: tl.constexpr = D_TOT // BLOCK_D
        sp_c = tl.minimum(sp, hw - 1)  # rows past the image re-read its last patch; the epilogue leaves them out
        oh_c = (sp_c.to(tl.uint32) // WO).to(tl.int32)
        x_row = x_ptr + n * sxn + ((oh_c * SH) * sxh + (sp_c - oh_c * WO) * (SW * C_PAD))
        for d0 in range(0, FULL * BLOCK_D, BLOCK_D):
            d = d0 + offs_d
            a = tl.load(x_row[:, None] + ((d // ROW) * (DH * sxh) + d % ROW)[None, :])
            b = tl.load(planes_ptr + d[:, None] + (offs_p * spp)[None, :])
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if D_TOT % BLOCK_D != 0:
            d = FULL * BLOCK_D + offs_d
            d_ok = d < D_TOT
            a = tl.load(x_row[:, None] + ((d // ROW) * (DH * sxh) + d % ROW)[None, :], mask=d_ok[None, :], other=0.0)
            b = tl.load(planes_ptr + d[:, None] + (offs_p * spp)[None, :])  # zero past D_TOT
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # Tap-major: reduction over d = tap * C + c (the NHWC order of a patch) in one loop: one software pipeline
        # across taps (a nested channel loop per tap drained the cp.async pipeline at every tap: +255 SASS
        # instructions per tap), and a chunk may span taps when C < BLOCK_D (ResNet's C = 64 reads 128-wide chunks).
        # The padding mask of every tap is computed once per tile, one bit per tap; a chunk column tests its bit.
        # x is contiguous NHWC: its strides come from the constant C (sxw = C, sxh = W * C, sxn = H * W * C), so the
        # compiler knows every pixel starts on a multiple of C elements (16-byte vectors when C % 8 == 0).
        sxw = C_CONST
        sxh = W * C_CONST
        sxn = H * sxh
        x_row = x_ptr + (n * sxn + ih0 * sxh + iw0 * sxw)
        TAP_BITS: tl.constexpr = KH * KW <= 32
        if TAP_BITS:
            # bit r*KW + s set when tap (r, s) of the position is inside the image: KH + KW range tests, not KH*KW
            cols = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for ts in tl.static_range(KW):
                iw_t = iw0 + ts * dil_w
                cols = cols | (((iw_t >= 0) & (iw_t < W)).to(tl.int32) << ts)
            inside = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for tr in tl.static_range(KH):
                ih_t = ih0 + tr * DH
                inside = inside | tl.where(m_ok & (ih_t >= 0) & (ih_t < H), cols << (tr * KW), 0)
        if not TAP_BITS:
            # More than 32 taps (e.g. 7x7): no bitmask; (tap, c0) carried from one iteration to the next.
            tap = 0
            c0 = 0
            for _ in range(KH * KW * tl.cdiv(C_CONST, BLOCK_D)):
                r = tap // KW
                s = tap - r * KW
                ih = ih0 + r * DH
                iw = iw0 + s * dil_w
                ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                c = c0 + offs_d
                c_ok = c < C_CONST
                a = tl.load(x_row[:, None] + (r * DH * sxh + s * dil_w * sxw + c)[None, :],
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(planes_ptr + r * sph + s * spw + c[:, None] + (offs_p * spp)[None, :],
                            mask=c_ok[:, None] & p_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                c0 += BLOCK_D
                wrap = c0 >= C_CONST
                tap = tl.where(wrap, tap + 1, tap)
                c0 = tl.where(wrap, 0, c0)
        else:
            # C_CONST = C: the column decomposition d -> (tap, r, s, c) divides by constants (a few instructions
            # per column, shared by all rows); only the last, partial chunk carries a column mask.
            D_TOT: tl.constexpr = KH * KW * C_CONST
            FULL: tl.constexpr = D_TOT // BLOCK_D
            for d0 in range(0, FULL * BLOCK_D, BLOCK_D):
                d = d0 + offs_d
                tap = d // C_CONST
                r = tap // KW
                col = r * (DH * sxh) + (tap - r * KW) * (dil_w * sxw) + (d - tap * C_CONST)
                ok = ((inside[:, None] >> tap[None, :]) & 1) != 0
                a = tl.load(x_row[:, None] + col[None, :], mask=ok, other=0.0)
                b = tl.load(planes_ptr + d[:, None] + (offs_p * spp)[None, :], mask=p_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if D_TOT % BLOCK_D != 0:
                d = FULL * BLOCK_D + offs_d
                d_ok = d < D_TOT
                tap = d // C_CONST
                r = tap // KW
                col = r * (DH * sxh) + (tap - r * KW) * (dil_w * sxw) + (d - tap * C_CONST)
                ok = (((inside[:, None] >> tap[None, :]) & 1) != 0) & d_ok[None, :]
                a = tl.load(x_row[:, None] + col[None, :], mask=ok, other=0.0)
                b = tl.load(planes_ptr + d[:, None] + (offs_p * spp)[None, :], mask=d_ok[:, None] & p_ok[None, :],
                            other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Epilogue: up to 32 planes, one word holds the sign bits of every plane (column p -> bit p) and table t is its
    # bits [t*K, t*K + K); columns p >= P (zero planes) set bits that no table reads. Wider: one reduction per table.
    ONE_WORD: tl.constexpr = BLOCK_P <= 32
    if ONE_WORD:
        word = tl.sum(tl.where(acc >= 0, (1 << offs_p)[None, :], 0), axis=1)
    n_invalid = BLOCK_M - tl.sum(m_ok.to(tl.int32), axis=0)
    # PER_SAMPLE: one (TABLES, N_BUCKETS) histogram per image, at hist_ptr + image * HIST_N. A ROWS tile lies in one
    # image (n is a scalar); a tap-major tile may span images: it keeps its per-program histogram only when all its
    # positions are in one image (a runtime test per tile: the usual case for maps larger than BLOCK_M), else it
    # adds one count per position into its own image's histogram.
    HIST_N: tl.constexpr = TABLES * N_BUCKETS
    hist_img = hist_ptr
    if PER_SAMPLE:
        if ROWS:
            hist_img = hist_ptr + n * HIST_N
        else:
            first = (pid * BLOCK_M) // hw
            one_image = first == (tl.minimum(pid * BLOCK_M + BLOCK_M, M) - 1) // hw
            hist_img = hist_ptr + first.to(tl.int64) * HIST_N
    for t in tl.static_range(TABLES):
        if ONE_WORD:
            code = (word >> (t * BITS)) & (N_BUCKETS - 1)
        else:
            in_t = (offs_p // BITS) == t
            code = tl.sum(tl.where((acc >= 0) & in_t[None, :], (1 << (offs_p % BITS))[None, :], 0), axis=1)
        if WRITE_CODES:
            tl.store(codes_ptr + n * scn + t * sct + sp, code.to(tl.int64), mask=m_ok)
        ones = tl.full((BLOCK_M,), 1, dtype=tl.int32)
        if LOCAL_HIST:
            # Positions past M are counted in bucket 0 by tl.histogram (their code is forced to 0), then removed.
            buckets = tl.arange(0, N_BUCKETS)
            local = tl.histogram(tl.where(m_ok, code, 0), N_BUCKETS)
            local = local - tl.where(buckets == 0, n_invalid, 0)
            if PER_SAMPLE and not ROWS:
                if one_image:
                    tl.atomic_add(hist_img + t * N_BUCKETS + buckets, local, mask=local > 0, sem="relaxed")
                else:
                    tl.atomic_add(hist_ptr + n * HIST_N + t * N_BUCKETS + code, ones, mask=m_ok, sem="relaxed")
            else:
                tl.atomic_add(hist_img + t * N_BUCKETS + buckets, local, mask=local > 0, sem="relaxed")
        else:
            hist_pos = hist_ptr + n * HIST_N if PER_SAMPLE else hist_ptr  # n: this position's image
            tl.atomic_add(hist_pos + t * N_BUCKETS + code, ones, mask=m_ok, sem="relaxed")


# Row pitch of the ROWS planes matrix: a multiple of every BLOCK_D, so any chunk reads inside the zero-padded row.
_ROWS_PLANES_ALIGN = 128


def rows_channels(c: int) -> int:
    """C_PAD of the ROWS order: channels padded to a power of two >= 4, so that every pixel starts on an 8-byte
    (fp16 / bf16) or 16-byte (fp32) boundary and a kernel row segment loads as vectors of C_PAD elements."""
    return max(4, triton.next_power_of_2(c))


def _rows_operands(x, planes, stride, padding, dilation, out_hw, block_p):
    """The ROWS order's operands: x as one zero-padded NHWC copy (N, Hp, Wp, C_PAD) holding the convolution's
    padding (an NCHW input needs one conversion pass anyway; this is that pass) and the planes as a zero-padded
    (block_p, D_PAD) matrix, row p = plane p as (kh, kw, C_PAD), zero past kh*kw*C_PAD up to a multiple of 128
    elements (aligned rows: vector loads; the kernel's last, partial chunk reads zeros there). x is returned as an
    (N, C_PAD, Hp, Wp) view with channels_last strides."""
    n, c, h, w = x.shape
    kh, kw = planes.shape[2:]
    ho, wo = out_hw
    c_pad = rows_channels(c)
    hp = max(h + 2 * padding[0], (ho - 1) * stride[0] + (kh - 1) * dilation[0] + 1)
    wp = max(w + 2 * padding[1], (wo - 1) * stride[1] + kw)
    wp += -wp % max(1, 16 // c_pad)  # row pitch a multiple of 16 elements: every row starts aligned
    xk = x.new_zeros(n, hp, wp, c_pad)
    xk[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w, :c] = x.permute(0, 2, 3, 1)
    d_tot = kh * kw * c_pad
    d_pad = triton.cdiv(d_tot, _ROWS_PLANES_ALIGN) * _ROWS_PLANES_ALIGN
    pk = planes.new_zeros(block_p, d_pad, dtype=x.dtype)
    pk[: planes.shape[0], :d_tot].view(-1, kh, kw, c_pad)[..., :c] = planes.permute(0, 2, 3, 1)
    return xk.permute(0, 3, 1, 2), pk, c_pad


def hash_histogram_forward(
    x: torch.Tensor,
    planes: torch.Tensor,
    bits: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    in_idx: torch.Tensor | None = None,
    return_codes: bool = False,
    per_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launcher of :func:`_hash_histogram_fwd_kernel`; the same contract as ``torch_hash_histogram``.

    Returns the (L, 2**bits) int64 histogram, and the (N, L, H', W') int64 codes when ``return_codes``. With
    ``per_sample`` the histogram is (N, L, 2**bits): row n counts the codes of sample n's patches only (issue #15:
    per-sample active sets), so that its sum over n is the batch histogram.
    Arguments are checked by ``tritonslide.ops.hash_histogram``; ``x`` may be NCHW or channels_last (channels_last
    is read in place; NCHW is converted once).
    """
    n, c, h, w = x.shape
    n_planes, _, kh, kw = planes.shape
    n_tables = n_planes // bits
    ho, wo = conv_out_hw(h, w, kh, kw, stride, padding, dilation)
    m = n * ho * wo
    if m >= 2**31:  # the histogram counters are int32
        raise ValueError(f"tritonslide.ops.hash_histogram: {m} patches exceed the kernel's int32 counters")
    c_read = c if in_idx is None else in_idx.numel()
    n_buckets = 1 << bits
    hist = torch.zeros((n,) * per_sample + (n_tables, n_buckets), dtype=torch.int32, device=x.device)
    codes = None
    if return_codes:
        codes = torch.empty(n, n_tables, ho, wo, dtype=torch.int64, device=x.device)
    if m == 0 or c_read == 0:
        # Empty batch: no patches. No channels read: every projection is 0, so every code is all ones (0 >= 0).
        if c_read == 0 and m > 0:
            hist[..., n_buckets - 1] = ho * wo if per_sample else m
            if codes is not None:
                codes.fill_(n_buckets - 1)
        hist = hist.to(torch.int64)
        return (hist, codes) if return_codes else hist
    rows = c_read < ROWS_MAX_CHANNELS and dilation[1] == 1
    if in_idx is not None or (not rows and c % 8):
        # One pass copies the channels the kernel reads into a compact NHWC tensor, zero channels up to a multiple
        # of 16 (in_idx: the kernel is then compiled per ceil(C_read / 16), not per active-set size) or of 8 (a
        # pixel of 16 bytes in fp16), and the kernel reads it like any input: vectors, no index loads (a gather
        # along the reduction axis, or pixels at 2-byte alignment, cannot vectorize; the AOT report found 3.4 KB
        # of spills in the scalar-load tiles of C = 20).
        c = c_read if rows else triton.cdiv(c_read, 16 if in_idx is not None else 8) * (16 if in_idx is not None else 8)
        x, planes = take_channels(x, in_idx, c), take_channels(planes, in_idx, c, dtype=x.dtype)
    block_p = next_pow2(n_planes)
    if rows:
        xk, pk, c_pad = _rows_operands(x, planes, stride, padding, dilation, (ho, wo), block_p)
        pad_args = (0, 0)  # the copy holds the padding
    else:
        c_pad = 1
        xk = activations_channels_last(x)
        pk = channels_inner(planes).to(x.dtype)  # (P, C, kh, kw) with channels_last strides, cached per version
        pad_args = padding
    sx = xk.stride()  # (n, c, h, w) order; the channel stride is 1
    spl = (pk.stride(0), 0, 0) if rows else (pk.stride(0), pk.stride(2), pk.stride(3))
    codes_arg = codes if codes is not None else hist  # never written when WRITE_CODES is False
    code_strides = codes.stride()[:2] if codes is not None else (0, 0)
    if rows:  # tiles within one image (see the kernel)
        grid = lambda meta: (n * triton.cdiv(ho * wo, meta["BLOCK_M"]),)  # noqa: E731
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _hash_histogram_fwd_kernel[grid](
        xk, pk, hist, codes_arg,
        m, n_planes, c, h, w,
        sx[0], sx[2], sx[3], *spl, *code_strides,
        *pad_args, dilation[1],
        SH=stride[0], SW=stride[1], DH=dilation[0], KH=kh, KW=kw, BITS=bits, TABLES=n_tables, N_BUCKETS=n_buckets,
        BLOCK_P=block_p, ROWS=rows, C_PAD=c_pad,
        WRITE_CODES=codes is not None, LOCAL_HIST=n_buckets <= LOCAL_HIST_MAX_BUCKETS,
        PRECISION=dot_precision(x.dtype), PER_SAMPLE=bool(per_sample), HO=ho, WO=wo,
        # C as a constant (its own compile, like kh and kw): the tap / channel split of a chunk column divides by it.
        C_CONST=0 if rows else c,
    )
    hist = hist.to(torch.int64)
    return (hist, codes) if return_codes else hist
