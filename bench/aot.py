"""Ahead-of-time compile report of every Triton kernel of ``tritonslide.kernels`` (issue #12, part 1).

Run from the repository root (no GPU needed: Triton compiles for a GPU target on the CPU with its bundled ptxas)::

    python -m bench.aot [--plan ci|full] [--targets 80,90] [--out bench/results/aot.json] [--workers 2]

For each kernel, every config of its autotune list (after the kernel's own ``early_config_prune``, applied to the
representative arguments), each constexpr variant a real launch produces (index sets present / absent, NCHW /
channels_last, ...), each dtype (fp16, bf16, fp32 with IEEE products, fp32 with TF32) and target (sm_80, sm_90) is
compiled with ``triton.compile``. The signature, constexprs and divisibility attributes come from Triton's own
launcher binder (``triton.runtime.jit.create_function_from_signature`` and ``JITFunction._pack_args``) called on
``MockTensor`` pointers (address 0: 16-aligned, as PyTorch's allocations are) and the launcher's integer arguments,
so integers equal to 1 become constexprs and multiples of 16 carry ``tt.divisibility`` exactly as on a GPU launch.

Per compile the record holds: registers, spill bytes (the per-thread stack frame plus local arrays, ``STACK`` +
``LOCAL`` of ``cuobjdump --dump-resource-usage``: ptxas puts spilled registers in the stack frame, and Triton's
kernels make no calls and keep no local arrays, so any of it is spill space),
shared memory (Triton's launch size ``metadata.shared``), tensor-core instructions in SASS (HMMA =
``mma.sync``, HGMMA = ``wgmma``), global load kinds and widths (``LDG.E.128`` ... ``LDG.E.U16``, ``LDGSTS`` =
cp.async, ``UTMALDG`` = TMA), the total SASS instruction count and the main loop (see :func:`sass_stats`).
A plain dense Triton GEMM (:func:`_dense_gemm_kernel`, row-major A and B, 16-aligned) is compiled with each
config's tile, warps and stages, and each kernel's main-loop length is reported as a ratio to it (same tile, dtype,
target): an instruction-count proxy for how much address / mask / gather work the kernel adds per MMA step, not a
time. Compile errors are recorded, not raised. ``--plan ci`` covers every kernel on every target with one dtype
(fp16) and one case per kernel; ``--plan full`` is the whole cross product described in :func:`build_plan`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# Fusion default of Triton 3.9 stated explicitly (it warns when unset); the launch path uses the same default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_BIN = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"
DTYPES = {"fp16": (torch.float16, "ieee"), "bf16": (torch.bfloat16, "ieee"), "fp32": (torch.float32, "ieee"),
          "tf32": (torch.float32, "tf32")}
# Programs that fill an H100 SXM (132 SMs, two per SM), as kernels/sketch.py's _target_programs computes on it:
# the split factors below are what its launchers would pick there (they only matter as 1 vs > 1 and % 16).
TARGET_PROGRAMS = 2 * 132


# ---------------------------------------------------------------------------------------------------- dense GEMM


@triton.jit
def _dense_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C = A @ B`` (row-major, fp32 accumulation): the baseline of the main-loop ratio."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k0) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _dense_args(dtype: torch.dtype, prec: str) -> dict[str, Any]:
    m = n = k = 4096
    t = _mock(dtype)
    return dict(a_ptr=t, b_ptr=t, c_ptr=t, M=m, N=n, K=k, stride_am=k, stride_bk=n, stride_cm=n, PRECISION=prec)


# ---------------------------------------------------------------------------------------------------- arguments


def _mock(dtype: torch.dtype):
    from triton.runtime.jit import MockTensor

    return MockTensor(dtype)


def _strides(shape, channels_last: bool = False) -> tuple[int, ...]:
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, device="meta", memory_format=fmt).stride()


def _out_hw(h, w, k, s, p, d=1):
    return (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1


# Representative layers (batch 64): (N, C, O, H, W, k, stride, pad)
CONV_SHAPES = {
    "vgg11_256x256_3x3@28": (64, 256, 256, 28, 28, 3, 1, 1),
    "resnet18_64x64_3x3@56": (64, 64, 64, 56, 56, 3, 1, 1),
    "alexnet_conv1_3x64_11x11s4": (64, 3, 64, 224, 224, 11, 4, 2),
    # every extent 1 that can be (batch, a 1x1 map, one active channel and filter at fraction 0.25): Triton's
    # launcher turns integer arguments equal to 1 into constexprs, which the interpreter never does, so code that
    # treats such an argument as a tensor compiles in the tests and fails only on a GPU
    "degenerate_4x4_3x3@1": (1, 4, 4, 1, 1, 3, 1, 1),
}
ACTIVE_FRACTION = 0.25  # ALSH active sets of a quarter of the filters / channels


def _r_pad(filters):
    """The backward launchers' padded width of dy's compact copy (``kernels/active_conv2d.py: DX_FILTER_ALIGN``)."""
    from tritonslide.kernels.active_conv2d import DX_FILTER_ALIGN

    return triton.cdiv(filters, DX_FILTER_ALIGN) * DX_FILTER_ALIGN


def _dx_phases(h, w, geom):
    """The dX launchers' stride phases (``kernels/active_conv2d.py: dx_phases``)."""
    from tritonslide.kernels.active_conv2d import dx_phases

    return dx_phases(h, w, (geom["SH"], geom["SW"]), (geom["DH"], geom["DW"]))


def _active_common(case, dtype, prec):
    """The kernels' operands as the launchers hand them over: x / dy NHWC holding the active channels only (the
    launchers compact in_idx / out_idx channels before the kernels), W as (O, kh, kw, C_act); ``layout`` is the
    memory format of the op's input and output (an NCHW op pays the conversion in the launcher, the kernels'
    stores follow the output's format)."""
    n, c, o, h, w, k, s, p = CONV_SHAPES[case["shape"]]
    ho, wo = _out_hw(h, w, k, s, p)
    cl = case["layout"] == "channels_last"
    idx = case["idx"]  # "none" | "out" | "out+in" | "out+count"
    has_out = idx != "none"
    has_in = idx == "out+in"
    has_count = idx == "out+count"
    n_act = max(1, int(o * ACTIVE_FRACTION)) if has_out else o
    c_act = max(1, int(c * ACTIVE_FRACTION)) if has_in else c
    t, i32 = _mock(dtype), _mock(torch.int32)
    geom = dict(KH=k, KW=k, SH=s, SW=s, PH=p, PW=p, DH=1, DW=1)
    idx_args = dict(out_idx_ptr=i32 if has_out else t, count_ptr=_mock(torch.int64) if has_count else t)
    return n, c, o, h, w, ho, wo, cl, n_act, c_act, t, geom, has_out, has_in, has_count, idx_args


def _active_fwd_base_args(case, dtype, prec):
    n, c, o, h, w, ho, wo, cl, n_act, c_act, t, geom, has_out, has_in, has_count, idx_args = _active_common(
        case, dtype, prec)
    sx, sw, sy = _strides((n, c_act, h, w), True), _strides((o, c_act, geom["KH"], geom["KW"]), True), \
        _strides((n, o, ho, wo), cl)
    return dict(x_ptr=t, w_ptr=t, b_ptr=t, y_ptr=t, **idx_args, M=n * ho * wo, N_ACT=n_act, C_ACT=c_act, H=h, W=w,
                HO=ho, WO=wo, sxn=sx[0], sxh=sx[2], sxw=sx[3], swo=sw[0], swh=sw[2], sww=sw[3], syn=sy[0], syc=sy[1],
                syh=sy[2], syw=sy[3], sio=0, **geom, HAS_BIAS=True, HAS_OUT_IDX=has_out, COMPACT_OUT=False,
                HAS_COUNT=has_count, Y_CHANNELS_LAST=cl, PRECISION=prec)


def _active_dx_base_args(case, dtype, prec):
    n, c, o, h, w, ho, wo, cl, n_act, c_act, t, geom, has_out, has_in, has_count, idx_args = _active_common(
        case, dtype, prec)
    # dy compacted to the active filters, zero-padded to a multiple of 64 columns (DX_FILTER_ALIGN)
    sg, sw, sd = _strides((n, _r_pad(n_act), ho, wo), True), _strides((o, c_act, geom["KH"], geom["KW"]), True), \
        _strides((n, c, h, w), cl)
    sw = _strides((n_act, c_act, geom["KH"], geom["KW"]), True)  # W's active rows and channels, compacted
    per_image, _, taps = _dx_phases(h, w, geom)
    return dict(g_ptr=t, w_ptr=t, dx_ptr=t, count_ptr=idx_args["count_ptr"], out_idx_ptr=t,
                in_idx_ptr=_mock(torch.int32) if has_in else t, M=n * per_image, **taps,
                C_ACT=c_act, R_ACT=n_act, H=h, W=w, HO=ho, WO=wo, sgn=sg[0], sgh=sg[2], sgw=sg[3],
                swo=sw[0], swh=sw[2], sww=sw[3], sdn=sd[0], sdc=sd[1], sdh=sd[2], sdw=sd[3], sio=0, **geom,
                SCATTER_IN=has_in, HAS_COUNT=has_count, DX_CHANNELS_LAST=cl, PRECISION=prec)


def _active_dw_base_args(case, dtype, prec):
    """dy as the dense (N*H'*W', n_act) matrix, x as the zero-padded NHWC frame of the active channels and the
    int32 position-row table (``kernels/active_conv2d.py: _padded_frame, _position_rows``)."""
    n, c, o, h, w, ho, wo, cl, n_act, c_act, t, geom, has_out, has_in, has_count, idx_args = _active_common(
        case, dtype, prec)
    f32 = _mock(torch.float32)
    sd = _strides((o, c, geom["KH"], geom["KW"]))
    return dict(g_ptr=t, x_ptr=t, rows_ptr=_mock(torch.int32), dw_ptr=f32, **idx_args,
                in_idx_ptr=_mock(torch.int32) if has_in else t, K_RED=n * ho * wo, R_ACT=n_act, C_ACT=c_act,
                WP=w + 2 * geom["PW"], sg=_r_pad(n_act), sx=c_act, sdo=sd[0], sdc=sd[1], sdh=sd[2], sdw=sd[3], sio=0,
                zero_row=0, KH=geom["KH"], KW=geom["KW"], DH=geom["DH"], DW=geom["DW"], HAS_OUT_IDX=has_out,
                HAS_IN_IDX=has_in, HAS_COUNT=has_count, PRECISION=prec)


def _hist_args(case, dtype, prec):
    """kernels/hash_histogram.py's launch: x channels_last (the launcher converts NCHW input once, so the kernel has
    no NCHW path); C >= 16: tap-major order over x as given and (P, kh, kw, C) planes; C < 16: ROWS order over the
    launcher's zero-padded (N, Hp, Wp, C_PAD) copy and a (16, D_PAD) planes matrix (``_rows_operands``)."""
    from tritonslide.kernels.hash_histogram import rows_channels

    n, c, _, h, w, k, s, p = CONV_SHAPES[case["shape"]]
    ho, wo = _out_hw(h, w, k, s, p)
    tables, bits = 3, case.get("bits", 5)  # ALSHConfig defaults: L = 3 tables of K = 5 bits
    if case["idx"] == "in":  # the launcher gathers the active channels into a compact copy, padded to 16s
        c_read = max(1, int(c * ACTIVE_FRACTION))
        c = c_read if c_read < 16 else triton.cdiv(c_read, 16) * 16
    n_planes, n_buckets = tables * bits, 1 << bits
    block_p = max(16, triton.next_power_of_2(n_planes))
    rows = c < 16
    if not rows and c % 8:  # the launcher pads the channels to a multiple of 8 in a compact copy
        c = triton.cdiv(c, 8) * 8
    if rows:
        c_pad = rows_channels(c)
        hp, wp = max(h + 2 * p, (ho - 1) * s + k), max(w + 2 * p, (wo - 1) * s + k)
        wp += -wp % max(1, 16 // c_pad)
        sx, sp = _strides((n, c_pad, hp, wp), True), (triton.cdiv(k * k * c_pad, 128) * 128, 0, 0, 0)
        pads = (0, 0)
    else:
        c_pad = 1
        sx, sp = _strides((n, c, h, w), True), _strides((n_planes, c, k, k), True)
        pads = (p, p)
    codes = case.get("codes", False)
    t, i32, i64 = _mock(dtype), _mock(torch.int32), _mock(torch.int64)
    sc = _strides((n, tables, ho, wo)) if codes else (0, 0, 0, 0)
    return dict(x_ptr=t, planes_ptr=t, hist_ptr=i32, codes_ptr=i64 if codes else i32,
                M=n * ho * wo, P=n_planes, C_READ=c, H=h, W=w, HO=ho, WO=wo, sxn=sx[0], sxh=sx[2], sxw=sx[3],
                spp=sp[0], sph=sp[2], spw=sp[3], scn=sc[0], sct=sc[1], pad_h=pads[0], pad_w=pads[1], dil_w=1,
                SH=s, SW=s, DH=1, KH=k, KW=k, BITS=bits, TABLES=tables, N_BUCKETS=n_buckets, BLOCK_P=block_p,
                ROWS=rows, C_PAD=c_pad, WRITE_CODES=codes, LOCAL_HIST=n_buckets <= 1024, PRECISION=prec,
                PER_SAMPLE=case.get("per_sample", False), C_CONST=0 if rows else c)


def _sample_common(case, dtype):
    """kernels/sample_conv2d.py's launches of active_conv2d's kernels with PER_SAMPLE: x NHWC (NCHW input is
    converted by the launcher), W as (O, kh, kw, C), the per-sample index rows as int32 (N, O) and counts (N,) (the
    backward pads the rows and dy's compact copy to 64 columns: R)."""
    n, c, o, h, w, k, s, p = CONV_SHAPES[case["shape"]]
    ho, wo = _out_hw(h, w, k, s, p)
    cl = case["layout"] == "channels_last"
    r_cols = _r_pad(o)
    geom = dict(KH=k, KW=k, SH=s, SW=s, PH=p, PW=p, DH=1, DW=1)
    return n, c, o, h, w, ho, wo, cl, r_cols, geom, _mock(torch.int32), _mock(torch.int64), _mock(dtype)


def _sample_fwd_args(case, dtype, prec):
    n, c, o, h, w, ho, wo, cl, r_cols, geom, i32, i64, t = _sample_common(case, dtype)
    sx, sw, sy = _strides((n, c, h, w), True), _strides((o, c, geom["KH"], geom["KW"]), True), \
        _strides((n, o, ho, wo), cl)
    a = dict(x_ptr=t, w_ptr=t, b_ptr=t, y_ptr=t, out_idx_ptr=i32, count_ptr=i64, M=n * ho * wo, N_ACT=o, C_ACT=c,
             H=h, W=w, HO=ho, WO=wo, sxn=sx[0], sxh=sx[2], sxw=sx[3], swo=sw[0], swh=sw[2], sww=sw[3], syn=sy[0],
             syc=sy[1], syh=sy[2], syw=sy[3], sio=o, **geom, HAS_BIAS=True, HAS_OUT_IDX=True, COMPACT_OUT=False,
             HAS_COUNT=True, Y_CHANNELS_LAST=cl, PRECISION=prec, PER_SAMPLE=True)
    if c < 16:  # the small-C frame and (O, D_PAD) weight rows, as the per-batch launch
        c_pad, _, sxr = _rows_frame(n, c, h, w, geom["PW"])
        d_pad = triton.cdiv(geom["KH"] * geom["KW"] * c_pad, 128) * 128
        a.update(sxn=sxr[0], sxh=sxr[1], sxw=sxr[2], swo=d_pad, swh=0, sww=0, ROWS=True, C_PAD=c_pad)
    return a


def _sample_dx_args(case, dtype, prec):
    """dy compacted per sample by the launcher's gather: (N, H', W', R) contiguous; W whole, channels padded to 16
    below 16 channels."""
    n, c, o, h, w, ho, wo, cl, r_cols, geom, i32, i64, t = _sample_common(case, dtype)
    c_ld = 16 if c < 16 else 0
    sw, sd = _strides((o, c_ld or c, geom["KH"], geom["KW"]), True), _strides((n, c, h, w), cl)
    per_image, _, taps = _dx_phases(h, w, geom)
    return dict(g_ptr=t, w_ptr=t, dx_ptr=t, in_idx_ptr=t, count_ptr=i64, out_idx_ptr=i32, M=n * per_image, **taps,
                C_ACT=c,
                R_ACT=r_cols, H=h, W=w, HO=ho, WO=wo, sgn=ho * wo * r_cols, sgh=wo * r_cols, sgw=r_cols, swo=sw[0],
                swh=sw[2], sww=sw[3], sdn=sd[0], sdc=sd[1], sdh=sd[2], sdw=sd[3], sio=r_cols, **geom,
                SCATTER_IN=False, HAS_COUNT=True, DX_CHANNELS_LAST=cl, PRECISION=prec, C_LD=c_ld, PER_SAMPLE=True)


def _sample_dw_args(case, dtype, prec):
    """dy as the dense (N*H'*W', R) compact matrix, x as the zero-padded NHWC frame (the small-C frame with its zero
    image below 16 channels) and the int32 position-row table; an fp32 dW buffer; program_id(1) is the sample."""
    n, c, o, h, w, ho, wo, cl, r_cols, geom, i32, i64, t = _sample_common(case, dtype)
    f32 = _mock(torch.float32)
    sd = _strides((o, c, geom["KH"], geom["KW"]))
    a = dict(g_ptr=t, x_ptr=t, rows_ptr=i32, dw_ptr=f32, out_idx_ptr=i32, in_idx_ptr=i32, count_ptr=i64,
             K_RED=ho * wo, R_ACT=r_cols, C_ACT=c, WP=w + 2 * geom["PW"], sg=r_cols, sx=c, sdo=sd[0], sdc=sd[1],
             sdh=sd[2], sdw=sd[3], sio=r_cols, zero_row=0, KH=geom["KH"], KW=geom["KW"], DH=1, DW=1,
             HAS_OUT_IDX=True, HAS_IN_IDX=False, HAS_COUNT=True, PRECISION=prec, PER_SAMPLE=True)
    if c < 16:  # ROWS: table entries past a sample read the zero image
        c_pad, wp, _ = _rows_frame(n, c, h, w, geom["PW"])
        a.update(WP=wp, sx=c_pad, ROWS=True, C_PAD=c_pad, zero_row=n * (h + 2 * geom["PH"]) * wp)
    return a


# Sketch layers: conv shapes above with rank r, or a linear layer (M rows, in, out, r) viewed as 1x1 convs.
SKETCH_LINEAR = {"alexnet_fc6_9216x4096_r256@64": (64, 9216, 4096, 256)}


def _sketch_geometry(case):
    if case["shape"] in SKETCH_LINEAR:
        m, cin, o, r = SKETCH_LINEAR[case["shape"]]
        return m, cin, o, 1, 1, 1, 1, 0, r
    n, c, o, h, w, k, s, p = CONV_SHAPES[case["shape"]]
    return n, c, o, h, w, k, s, p, case.get("r", 64)


def _split(work_tiles: int, reduction: int, chunk: int) -> int:
    """kernels/sketch.py's _split with an H100's target program count."""
    if work_tiles >= TARGET_PROGRAMS:
        return 1
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, work_tiles), triton.cdiv(reduction, chunk), 64))


def _sketch_common(case, dtype):
    n, c, o, h, w, k, s, p, r = _sketch_geometry(case)
    oh, ow = _out_hw(h, w, k, s, p)
    cl = case["layout"] == "channels_last"
    has_idx = case["idx"] == "out"
    oa = max(1, int(o * ACTIVE_FRACTION)) if has_idx else o
    conv = dict(sh=s, sw=s, ph=p, pw=p, dh=1, dw=1)
    return n, c, o, h, w, k, oh, ow, r, cl, has_idx, oa, conv, _mock(dtype)


def _sketch_fwd_base_args(case, dtype, prec):
    """The launcher's arguments: x dense NHWC whatever ``layout`` (it converts NCHW once), A in (r, kh, kw, C);
    ``layout`` sets the strides of the outputs y and z (x's memory format)."""
    n, c, o, h, w, k, oh, ow, r, cl, has_idx, oa, conv, t = _sketch_common(case, dtype)
    m = n * oh * ow
    block_r = min(max(16, triton.next_power_of_2(r)), 128)
    m_tiles = triton.cdiv(m, 64)
    o_split = min(16, _split(m_tiles, max(oa, 1), 64)) if m_tiles < TARGET_PROGRAMS // 4 else 1
    sy, sz = _strides((n, o, oh, ow), cl), _strides((n, r, oh, ow), cl)
    fma = dtype == torch.float32 and prec == "ieee"
    return dict(x_ptr=t, a_ptr=t, b_ptr=t, bias_ptr=t, perm_ptr=_mock(torch.int32) if has_idx else t, y_ptr=t,
                z_ptr=t, M=m, C=c, H=h, W=w, OH=oh, OW=ow, R=r, OC=o, OA=oa, O_SPLIT=o_split,
                sxn=h * w * c, sxh=w * c, sxw=c, syn=sy[0], syc=sy[1], syh=sy[2], syw=sy[3],
                szn=sz[0], szc=sz[1], szh=sz[2], szw=sz[3], **conv, KH=k, KW=k, TAP_MAJOR=c % 16 == 0 or c >= 64,
                HAS_BIAS=True, HAS_IDX=has_idx, SINGLE_R=r <= block_r and not fma, BLOCK_R=block_r, PRECISION=prec)


def _sketch_dz_args(case, dtype, prec):
    """With out_idx the launcher compacts G's active columns (row stride OA rounded up to 16) and B's active rows."""
    n, c, o, h, w, k, oh, ow, r, cl, has_idx, oa, conv, t = _sketch_common(case, dtype)
    m = n * oh * ow
    split = _split(triton.cdiv(m, 64) * triton.cdiv(r, 64), oa, 128)
    per = triton.cdiv(triton.cdiv(oa, split), 64) * 64
    split = triton.cdiv(oa, per)
    return dict(g_ptr=t, b_ptr=t, dz_ptr=_mock(torch.float32) if split > 1 else t, M=m, R=r, OA=oa,
                LDG=triton.cdiv(oa, 16) * 16 if has_idx else o, SPLIT=split, o_per_split=per, PARTIAL=split > 1,
                PRECISION=prec)


def _sketch_db_args(case, dtype, prec):
    n, c, o, h, w, k, oh, ow, r, cl, has_idx, oa, conv, t = _sketch_common(case, dtype)
    m = n * oh * ow
    split = _split(triton.cdiv(oa, 64) * triton.cdiv(r, 64), m, 256)
    f32 = _mock(torch.float32)
    # db runs in the kernel except with TF32 products (the launcher sums it with torch there)
    return dict(g_ptr=t, z_ptr=t, dbw_ptr=f32, dbias_ptr=f32, M=m, R=r, OA=oa,
                LDG=triton.cdiv(oa, 16) * 16 if has_idx else o, SPLIT=split, m_per_split=triton.cdiv(m, split),
                NEED_B=True, NEED_BIAS=prec != "tf32", PRECISION=prec)


def _sketch_da_base_args(case, dtype, prec):
    n, c, o, h, w, k, oh, ow, r, cl, has_idx, oa, conv, t = _sketch_common(case, dtype)
    m = n * oh * ow
    split = _split(triton.cdiv(r, 64) * triton.cdiv(c * k * k, 64), m, 256)
    tap_major = c % 16 == 0 or c >= 64
    table = tap_major and not (k == 1 and conv["sh"] == 1 and conv["ph"] == 0)
    return dict(x_ptr=t, dz_ptr=t, rows_ptr=_mock(torch.int32) if table else t, da_ptr=_mock(torch.float32), M=m,
                C=c, H=h, W=w, OH=oh, OW=ow, R=r, SPLIT=split, m_per_split=triton.cdiv(m, split), sxn=h * w * c,
                sxh=w * c, sxw=c, **conv, KH=k, KW=k, TAP_MAJOR=tap_major, ROW_TABLE=table, PRECISION=prec)


def _sketch_dx_base_args(case, dtype, prec):
    n, c, o, h, w, k, oh, ow, r, cl, has_idx, oa, conv, t = _sketch_common(case, dtype)
    sd = _strides((n, c, h, w), cl)
    return dict(dz_ptr=t, a_ptr=t, dx_ptr=t, MI=n * h * w, C=c, H=h, W=w, OH=oh, OW=ow, R=r, sdn=sd[0], sdc=sd[1],
                sdh=sd[2], sdw=sd[3], **conv, KH=k, KW=k, UNIT_STRIDE=conv["sh"] == 1, PRECISION=prec)


# ---------------------------------------------------------------------------------------------------- small C
# Inputs of fewer than 16 channels (AlexNet's conv1: 3) take the launchers' ROWS paths (issue #12): x copied once into
# a zero-padded NHWC frame with C_PAD = max(4, next power of two) channels and 16-element-aligned rows, the reduction
# running over a kernel row's contiguous kw x C_PAD elements (weights as a (rows, D_PAD) matrix, D_PAD a multiple of
# 128); dX / sketch dX pad W's / A's channels to 16. These builders add what those launches pass.
def _rows_frame(n, c, h, w, p):
    """(C_PAD, padded width, the frame's (n, h, w) strides) of ``kernels/active_conv2d.py``'s small-C frame."""
    c_pad = max(4, triton.next_power_of_2(c))
    wp = w + 2 * p
    wp += -wp % max(1, 16 // c_pad)
    hp = h + 2 * p
    return c_pad, wp, (hp * wp * c_pad, wp * c_pad, c_pad)


def _active_fwd_args(case, dtype, prec):
    a = _active_fwd_base_args(case, dtype, prec)
    if a["C_ACT"] < 16 and a["DW"] == 1:
        c_pad, _, sx = _rows_frame(CONV_SHAPES[case["shape"]][0], a["C_ACT"], a["H"], a["W"], a["PW"])
        d_pad = triton.cdiv(a["KH"] * a["KW"] * c_pad, 128) * 128
        a.update(sxn=sx[0], sxh=sx[1], sxw=sx[2], swo=d_pad, swh=0, sww=0, ROWS=True, C_PAD=c_pad)
    return a


def _active_dx_args(case, dtype, prec):
    a = _active_dx_base_args(case, dtype, prec)
    if a["C_ACT"] < 16:
        sw = _strides((a["R_ACT"], 16, a["KH"], a["KW"]), True)
        a.update(swo=sw[0], swh=sw[2], sww=sw[3], C_LD=16)
    return a


def _active_dw_args(case, dtype, prec):
    a = _active_dw_base_args(case, dtype, prec)
    if a["C_ACT"] < 16 and a["DW"] == 1:
        n, _, _, h, w, _, _, p = CONV_SHAPES[case["shape"]]
        c_pad, wp, _ = _rows_frame(n, a["C_ACT"], h, w, p)
        a.update(WP=wp, sx=c_pad, ROWS=True, C_PAD=c_pad)
    return a


def _sketch_fwd_args(case, dtype, prec):
    a = _sketch_fwd_base_args(case, dtype, prec)
    if a["C"] < 16 and a["dw"] == 1 and case["shape"] in CONV_SHAPES:
        c_pad, _, sx = _rows_frame(CONV_SHAPES[case["shape"]][0], a["C"], a["H"], a["W"], a["pw"])
        a.update(sxn=sx[0], sxh=sx[1], sxw=sx[2], ROWS=True, C_PAD=c_pad)
    return a


def _sketch_da_args(case, dtype, prec):
    a = _sketch_da_base_args(case, dtype, prec)
    if a["C"] < 16 and a["dw"] == 1 and case["shape"] in CONV_SHAPES:
        c_pad, _, sx = _rows_frame(CONV_SHAPES[case["shape"]][0], a["C"], a["H"], a["W"], a["pw"])
        split = _split(triton.cdiv(a["R"], 64) * triton.cdiv(a["KH"] * a["KW"] * c_pad, 64), a["M"], 256)
        per = triton.cdiv(triton.cdiv(a["M"], split), 128) * 128
        a.update(sxn=sx[0], sxh=sx[1], sxw=sx[2], rows_ptr=_mock(torch.int32), ROW_TABLE=False, ROWS=True,
                 C_PAD=c_pad, SPLIT=triton.cdiv(a["M"], per), m_per_split=per)
    return a


def _sketch_dx_args(case, dtype, prec):
    a = _sketch_dx_base_args(case, dtype, prec)
    if a["C"] < 16:
        a.update(C_A=16)
    return a


# kernel -> (module, autotuned object name, argument builder, names of the GEMM tile (M, N, K) constexprs)
KERNELS = {
    "active_fwd": ("active_conv2d", "_active_conv2d_fwd_kernel", _active_fwd_args, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    "active_dx": ("active_conv2d", "_active_conv2d_bwd_dx_kernel", _active_dx_args, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    "active_dw": ("active_conv2d", "_active_conv2d_bwd_dw_kernel", _active_dw_args, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    # the per-sample launches (issue #15): the same kernels with PER_SAMPLE
    "sample_fwd": ("active_conv2d", "_active_conv2d_fwd_kernel", _sample_fwd_args, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    "sample_dx": ("active_conv2d", "_active_conv2d_bwd_dx_kernel", _sample_dx_args, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    "sample_dw": ("active_conv2d", "_active_conv2d_bwd_dw_kernel", _sample_dw_args, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    "hash_histogram": ("hash_histogram", "_hash_histogram_fwd_kernel", _hist_args, ("BLOCK_M", "BLOCK_P", "BLOCK_D")),
    "sketch_fwd": ("sketch", "_sketch_conv2d_fwd_kernel", _sketch_fwd_args, ("BLOCK_M", "BLOCK_R", "BLOCK_K")),
    "sketch_dz": ("sketch", "_sketch_conv2d_bwd_dz_kernel", _sketch_dz_args, ("BLOCK_M", "BLOCK_R", "BLOCK_O")),
    "sketch_db": ("sketch", "_sketch_conv2d_bwd_db_kernel", _sketch_db_args, ("BLOCK_O", "BLOCK_R", "BLOCK_M")),
    "sketch_da": ("sketch", "_sketch_conv2d_bwd_da_kernel", _sketch_da_args, ("BLOCK_R", "BLOCK_K", "BLOCK_M")),
    "sketch_dx": ("sketch", "_sketch_conv2d_bwd_dx_kernel", _sketch_dx_args, ("BLOCK_M", "BLOCK_C", "BLOCK_R")),
}


def _autotuner(kernel: str):
    import importlib

    module, name, _, _ = KERNELS[kernel]
    return getattr(importlib.import_module(f"tritonslide.kernels.{module}"), name)


def kernel_configs(kernel: str, nargs: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The autotune configs a launch with ``nargs`` would time: the kernel's ``early_config_prune`` applied."""
    at = _autotuner(kernel)
    configs = list(at.configs)
    prune = getattr(at, "early_config_prune", None)
    how = "all configs (no prune function)"
    if prune is not None:
        configs = prune(configs, nargs)
        how = f"pruned by {prune.__name__}"
    out = [{"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
    return out, how


# ---------------------------------------------------------------------------------------------------- compile


def _specialize(fn, args: dict[str, Any], target, options: dict[str, Any]):
    """(signature, constexprs, attrs) exactly as the JIT launcher builds them for these arguments."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(**args)
    _, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, opts)
    return signature, constexprs, attrs


_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(0x[0-9a-f]+)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0] if text else ""


def _ldg_width(op: str) -> int:
    for w in (128, 64):
        if f".{w}" in op:
            return w
    if ".U16" in op or ".S16" in op:
        return 16
    if ".U8" in op or ".S8" in op:
        return 8
    return 32


def sass_stats(cubin: bytes) -> dict[str, Any]:
    """Resource usage and SASS counts of a cubin (``cuobjdump --dump-resource-usage`` and ``-sass``).

    Main loop: every ``BRA`` to an earlier address closes a loop [target, branch]; the main loop is the one that
    holds the most tensor-core instructions (HMMA / HGMMA; FFMA for kernels without them), the innermost such loop
    on ties (an outer loop around an inner dot loop holds the same MMAs). Its length is in instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(TRITON_BIN / "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    m = _RES.search(res)
    regs, stack, static_smem, local = (int(v) for v in m.groups()) if m else (None, None, None, None)
    instrs = []  # (address, opcode, text)
    for line in sass.splitlines():
        im = _INSTR.match(line)
        if im:
            text = im.group(2)
            instrs.append((int(im.group(1), 16), _opcode(text), text))
    ops = Counter(op for _, op, _ in instrs)

    def family(op):
        return op.split(".")[0]

    mma = Counter()
    loads = Counter()
    ldg_width = Counter()
    for op, cnt in ops.items():
        fam = family(op)
        if fam in ("HMMA", "HGMMA", "IMMA", "DMMA"):
            mma[op] += cnt
        if fam in ("LDG", "LDGSTS", "UTMALDG", "LDSM", "LDS"):
            loads[op] += cnt
        if fam == "LDG":
            ldg_width[_ldg_width(op)] += cnt

    def count_in(lo, hi, fams):
        return sum(1 for a, op, _ in instrs if lo <= a <= hi and family(op) in fams)

    loops = []
    for addr, op, text in instrs:
        bm = _BRA.match(text)
        if bm:
            tgt = int(bm.group(1), 16)
            if tgt < addr:
                lo_hi = (tgt, addr)
                n = sum(1 for a, _, _ in instrs if tgt <= a <= addr)
                loops.append({"start": hex(tgt), "end": hex(addr), "instructions": n,
                              "mma": count_in(*lo_hi, ("HMMA", "HGMMA")), "ffma": count_in(*lo_hi, ("FFMA",)),
                              "ldg": count_in(*lo_hi, ("LDG",)), "ldgsts": count_in(*lo_hi, ("LDGSTS",)),
                              "tma": count_in(*lo_hi, ("UTMALDG",)),
                              "ldg_bits": {str(k): v for k, v in sorted(Counter(
                                  _ldg_width(op) for a, op, _ in instrs if tgt <= a <= addr and family(op) == "LDG"
                              ).items())}})
    main = None
    if loops:
        key = "mma" if any(lp["mma"] for lp in loops) else "ffma"
        main = max(loops, key=lambda lp: (lp[key], -lp["instructions"]))
    return {
        "regs": regs, "spill_bytes": stack + local, "stack_bytes": stack, "static_smem": static_smem,
        "sass_instructions": len(instrs), "mma": dict(mma), "loads": dict(loads),
        "ldg_width_bits": {str(k): v for k, v in sorted(ldg_width.items())}, "loops": loops, "main_loop": main,
    }


def _ptx_counts(ptx: str) -> dict[str, int]:
    return {"mma.sync": len(re.findall(r"\bmma\.sync", ptx)), "wgmma.mma_async": len(re.findall(r"wgmma\.mma_async",
                                                                                                 ptx)),
            "cp.async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
            "cp.async.bulk.tensor": len(re.findall(r"cp\.async\.bulk\.tensor", ptx))}


def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one (kernel, case, dtype, target, config) and return its record; errors are recorded."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rec = dict(job)
    t0 = time.perf_counter()
    try:
        dtype, prec = DTYPES[job["dtype"]]
        target = GPUTarget("cuda", job["target"], 32)
        if job["kernel"] == "dense_gemm":
            fn, args = _dense_gemm_kernel, _dense_args(dtype, prec)
        else:
            fn = _autotuner(job["kernel"]).fn
            args = KERNELS[job["kernel"]][2](job["case"], dtype, prec)
        args.update(job["config"]["kwargs"])
        options = {"num_warps": job["config"]["num_warps"], "num_stages": job["config"]["num_stages"]}
        signature, constexprs, attrs = _specialize(fn, args, target, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
        rec.update(sass_stats(compiled.asm["cubin"]))
        rec["smem"] = compiled.metadata.shared
        rec["ptx"] = _ptx_counts(compiled.asm["ptx"])
        rec["constexpr_args"] = sorted(fn.arg_names[k[0]] for k in constexprs if not fn.params[k[0]].is_constexpr)
        rec["ok"] = True
    except Exception as exc:  # recorded, not raised: one failing config must not hide the others
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        rec["traceback"] = traceback.format_exc(limit=3)[-2000:]
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    return rec


# ---------------------------------------------------------------------------------------------------- plans


def _cases(kernel: str, plan: str) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """(case, dtypes) pairs. The main case of each kernel runs in every dtype; variants run in fp16 only (constexpr
    flags change the address / mask code, which is the same for every element type)."""
    all_dt = ("fp16", "bf16", "fp32", "tf32")
    if kernel.startswith("active"):
        # linked layers at fraction 0.25 (the active extents clamp the tiles to 64), and the whole layer (no index
        # set: the full 128-wide tiles), both in every dtype
        main = {"shape": "vgg11_256x256_3x3@28", "layout": "channels_last", "idx": "out+in"}
        extra_mains = [dict(main, idx="none")]
        variants = [dict(main, layout="nchw"), dict(main, idx="out"),
                    dict(main, idx="out+count"), dict(main, shape="resnet18_64x64_3x3@56"),
                    dict(main, shape="alexnet_conv1_3x64_11x11s4", idx="out")]
    elif kernel == "hash_histogram":
        # The kernel reads channels_last only (NCHW input is converted by the launcher): no NCHW variant.
        main = {"shape": "vgg11_256x256_3x3@28", "layout": "channels_last", "idx": "none"}
        variants = [dict(main, idx="in"), dict(main, codes=True), dict(main, bits=12),
                    dict(main, shape="alexnet_conv1_3x64_11x11s4"), dict(main, shape="resnet18_64x64_3x3@56"),
                    # per-sample histograms (issue #15): tap-major (the one-image test per tile), per-position
                    # atomics, ROWS
                    dict(main, per_sample=True), dict(main, per_sample=True, bits=12),
                    dict(main, shape="alexnet_conv1_3x64_11x11s4", per_sample=True)]
    elif kernel.startswith("sample"):
        # per-sample active sets (issue #15): every filter may be active, so the tiles see the whole layer (no
        # compaction of the channels, as the op layer masks x); NCHW only changes the strides of the stores
        main = {"shape": "vgg11_256x256_3x3@28", "layout": "channels_last", "idx": "per-sample"}
        variants = [dict(main, layout="nchw"), dict(main, shape="resnet18_64x64_3x3@56"),
                    dict(main, shape="alexnet_conv1_3x64_11x11s4")]
    else:
        # sketch: the default layout path (channels_last activations, all channels active) is the main case; the
        # launcher converts NCHW x / grad_y once, so "nchw" only changes the strides of the stores (y, z, dx)
        main = {"shape": "vgg11_256x256_3x3@28", "layout": "channels_last", "idx": "none", "r": 64}
        variants = [dict(main, layout="nchw"), dict(main, idx="out"),
                    dict(main, shape="resnet18_64x64_3x3@56"),
                    dict(main, shape="alexnet_conv1_3x64_11x11s4", r=16),
                    {"shape": "alexnet_fc6_9216x4096_r256@64", "layout": "channels_last", "idx": "none"}]
    mains = [main] + (extra_mains if kernel.startswith("active") else [])
    degenerate = dict(main, shape="degenerate_4x4_3x3@1", r=16)
    if plan == "ci":
        ci = [(main, ("fp16",)), (degenerate, ("fp16",))]
        if kernel in SMALL_C_KERNELS:  # the gate checks the small-C paths' loads in CI too
            conv1 = dict(main, shape="alexnet_conv1_3x64_11x11s4")
            if kernel.startswith("active"):
                conv1["idx"] = "out"
            elif kernel.startswith("sketch"):
                conv1["r"] = 16
            ci.append((conv1, ("fp16",)))
        return ci
    variants.append(degenerate)
    return [(m, all_dt) for m in mains] + [(v, ("fp16",)) for v in variants]


# kernels with a small-C (ROWS / padded-channel) path for AlexNet's conv1 (issue #12; the per-sample launches run
# the active kernels, issue #15)
SMALL_C_KERNELS = ("active_fwd", "active_dx", "active_dw", "sample_fwd", "sample_dx", "sample_dw", "sketch_fwd",
                   "sketch_da", "sketch_dx")

# Full plan: the variants compile for the newest target only (sm_90); the main case covers every target. Compiling
# the variants for sm_80 too doubles the plan to ~1,230 compiles, about 17 min on 2 cores.
VARIANT_TARGETS_LAST_ONLY = True


def _case_name(case: dict[str, Any]) -> str:
    extra = "".join(f",{k}={case[k]}" for k in ("r", "bits", "codes", "per_sample") if k in case)
    return f"{case['shape']},{case['layout']},idx={case['idx']}{extra}"


def build_plan(plan: str, targets: list[int], only_dtypes: tuple[str, ...] | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Jobs of ``plan``. ci: every kernel's main case, fp16, all its (pruned) configs, every target.
    full: the main case in fp16 / bf16 / fp32 (IEEE) / fp32 (TF32) on every target, plus the layout / index-set /
    shape variants of :func:`_cases` in fp16 on the last target (``VARIANT_TARGETS_LAST_ONLY``); every (pruned)
    config. ``only_dtypes`` keeps those dtypes only. Each distinct (tile, warps, stages, dtype, target)
    also gets one dense GEMM job."""
    jobs, prune_notes, dense = [], {}, {}
    for kernel in KERNELS:
        for n_case, (case, dtypes) in enumerate(_cases(kernel, plan)):
            case_targets = targets[-1:] if len(dtypes) == 1 and VARIANT_TARGETS_LAST_ONLY and plan != "ci" else targets
            for dt in dtypes:
                if only_dtypes and dt not in only_dtypes:
                    continue
                dtype, prec = DTYPES[dt]
                nargs = KERNELS[kernel][2](case, dtype, prec)
                configs, how = kernel_configs(kernel, nargs)
                prune_notes[kernel] = how
                for cfg in configs:
                    tile = tuple({**nargs, **cfg["kwargs"]}[k] for k in KERNELS[kernel][3])
                    for tg in case_targets:
                        jobs.append({"kernel": kernel, "case": case, "variant": _case_name(case), "dtype": dt,
                                     "target": tg, "config": cfg, "gemm_tile": tile})
                        dkey = (tile, cfg["num_warps"], cfg["num_stages"], dt, tg)
                        dense[dkey] = {"kernel": "dense_gemm", "case": {}, "variant": "row-major 4096^3", "dtype": dt,
                                       "target": tg, "gemm_tile": tile,
                                       "config": {"kwargs": dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tile)),
                                                  "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}}
    return list(dense.values()) + jobs, prune_notes


def _dense_key(rec):
    return (tuple(rec["gemm_tile"]), rec["config"]["num_warps"], rec["config"]["num_stages"], rec["dtype"],
            rec["target"])


def attach_ratios(records: list[dict[str, Any]]) -> None:
    dense = {_dense_key(r): r for r in records if r["kernel"] == "dense_gemm" and r.get("ok")}
    for r in records:
        if r["kernel"] == "dense_gemm" or not r.get("ok"):
            continue
        d = dense.get(_dense_key(r))
        ml, dl = r.get("main_loop"), d.get("main_loop") if d else None
        r["dense_main_loop"] = dl["instructions"] if dl else None
        r["loop_ratio_vs_dense"] = round(ml["instructions"] / dl["instructions"], 2) if ml and dl else None


# H200 (issue #12): 132 SMs x 4 warp schedulers x 1.98 GHz, one warp-instruction per scheduler per cycle at best;
# 4.3 TB/s is the measured device-to-device copy rate (4.8 TB/s peak).
H200_WARP_ISSUE_PER_S = 132 * 4 * 1.98e9
H200_COPY_BYTES_PER_S = 4.3e12


def hash_issue_model(rec: dict[str, Any]) -> dict[str, Any] | None:
    """ESTIMATE, from SASS only, of the hash kernel's issue time against the time of reading x once on an H200.

    Per tile (one program, ``num_warps`` warps, all executing the same SASS): the main loop runs ``iterations``
    times (from the launch arguments of :func:`_hist_args`: tap-major, floor(kh*kw*C / BLOCK_D), or
    kh*kw*cdiv(C, BLOCK_D) above 32 taps; ROWS, floor(kh*kw*C_PAD / BLOCK_D); 0 when the compiler unrolled the
    reduction) and every other instruction of the kernel (position decomposition, padding bitmask, pipeline
    prologue, peeled partial chunk, sign packing, histogram, atomics) runs once:
    ``warp_instr_per_tile = num_warps * (iterations * loop + (sass_instructions - loop))``. The grid issues
    ``cdiv(M, BLOCK_M)`` tiles (ROWS: ``N * cdiv(H'W', BLOCK_M)``, tiles within one image) at
    ``H200_WARP_ISSUE_PER_S`` (every scheduler issuing every cycle: a lower bound on the time; no stall, no tail
    effect, one issue slot per HGMMA / LDGSTS; branches inside the epilogue counted as taken once). The reference is
    x read once from memory as the op receives it (N*C*H*W elements, unpadded) at ``H200_COPY_BYTES_PER_S``. Not
    modelled: the launcher's NCHW -> NHWC conversion or ROWS padding copy (one extra pass over x when it happens),
    memory stalls, atomic contention on the histogram. sm_80 records get the same H200 constants (their code, not
    an A100's rates). Ratio <= 1.5 is issue #12's target."""
    if rec["kernel"] != "hash_histogram" or not rec.get("ok"):
        return None
    dtype, prec = DTYPES[rec["dtype"]]
    a = {**_hist_args(rec["case"], dtype, prec), **rec["config"]["kwargs"]}
    n, c, _, h, w, k, s, p = CONV_SHAPES[rec["case"]["shape"]]
    if a["ROWS"]:  # the partial last chunk is peeled out of the loop: counted in `once`
        iterations = a["KH"] * a["KW"] * a["C_PAD"] // a["BLOCK_D"]
    elif a["KH"] * a["KW"] <= 32:  # flattened (tap, channel) reduction, partial last chunk peeled
        iterations = a["KH"] * a["KW"] * a["C_CONST"] // a["BLOCK_D"]
    else:
        iterations = a["KH"] * a["KW"] * triton.cdiv(a["C_CONST"], a["BLOCK_D"])
    if rec.get("main_loop") is None:  # a reduction short enough for the compiler to unroll: all of it runs once
        iterations = 0
    loop = rec["main_loop"]["instructions"] if iterations else 0
    once = rec["sass_instructions"] - loop
    per_tile = rec["config"]["num_warps"] * (iterations * loop + once)
    tiles = n * triton.cdiv(a["HO"] * a["WO"], a["BLOCK_M"]) if a["ROWS"] else triton.cdiv(a["M"], a["BLOCK_M"])
    total = tiles * per_tile
    x_elems = n * c * h * w
    issue_s = total / H200_WARP_ISSUE_PER_S
    read_s = x_elems * torch.finfo(dtype).bits / 8 / H200_COPY_BYTES_PER_S
    return {"estimate": True, "iterations_per_tile": iterations, "loop_instructions": loop,
            "once_instructions": once, "warp_instr_per_tile": per_tile, "tiles": tiles,
            "warp_instr_per_input_element": round(total / x_elems, 3),
            "warp_instr_per_patch_element": round(total / (a["M"] * c * k * k), 4),
            "loop_share": round(iterations * loop / per_tile * rec["config"]["num_warps"], 3),
            "issue_us": round(issue_s * 1e6, 2), "read_x_us": round(read_s * 1e6, 2),
            "issue_over_read": round(issue_s / read_s, 2)}


def _issue_model_summary(ok: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (shape, variant, dtype, target): the best and worst config's issue/read ratio (autotuning picks one)."""
    by = defaultdict(list)
    for r in ok:
        r["issue_model"] = hash_issue_model(r)
        if r["issue_model"]:
            by[f"{r['variant']} {r['dtype']} sm{r['target']}"].append((r["issue_model"]["issue_over_read"], r))
    out = {}
    for key, vals in sorted(by.items()):
        vals.sort(key=lambda v: v[0])
        out[key] = {"best": vals[0][0], "best_config": _cfg_str(vals[0][1]), "worst": vals[-1][0],
                    "best_warp_instr_per_input_element":
                        vals[0][1]["issue_model"]["warp_instr_per_input_element"]}
    return out


# ---------------------------------------------------------------------------------------------------- report


def _cfg_str(rec):
    c = rec["config"]
    kw = c["kwargs"]
    return "/".join(str(v) for v in kw.values()) + f" w{c['num_warps']}s{c['num_stages']}"


def _mma_str(rec):
    if not rec.get("mma"):
        return "none"
    fams = Counter()
    for op, n in rec["mma"].items():
        fams[op.split(".")[0]] += n
    return ",".join(f"{k}:{v}" for k, v in sorted(fams.items()))


def _loads_str(rec):
    w = rec.get("ldg_width_bits", {})
    parts = [f"{k}b:{v}" for k, v in sorted(w.items(), key=lambda kv: -int(kv[0]))]
    for fam in ("LDGSTS", "UTMALDG"):
        n = sum(v for op, v in rec.get("loads", {}).items() if op.split(".")[0] == fam)
        if n:
            parts.append(f"{fam}:{n}")
    return " ".join(parts) or "-"


def print_table(records: list[dict[str, Any]]) -> None:
    cols = ("kernel", "variant", "dt", "sm", "config", "regs", "spill", "smem", "mma", "LDG widths", "loop",
            "x dense")
    rows = []
    for r in records:
        if not r.get("ok"):
            rows.append((r["kernel"], r["variant"], r["dtype"], r["target"], _cfg_str(r), "ERR", "", "", "",
                         r["error"][:60], "", ""))
            continue
        ml = r.get("main_loop")
        rows.append((r["kernel"], r["variant"], r["dtype"], r["target"], _cfg_str(r), r["regs"], r["spill_bytes"],
                     r["smem"], _mma_str(r), _loads_str(r), ml["instructions"] if ml else "-",
                     r.get("loop_ratio_vs_dense", "-") if r["kernel"] != "dense_gemm" else ""))
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    for row in (cols, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    by = defaultdict(list)
    for r in records:
        by[r["kernel"]].append(r)
    out = {}
    for kernel, rs in by.items():
        ok = [r for r in rs if r.get("ok")]
        ratios = sorted(r["loop_ratio_vs_dense"] for r in ok if r.get("loop_ratio_vs_dense") is not None)
        mma = Counter()
        for r in ok:
            mma[_mma_str(r)] += 1
        out[kernel] = {
            "compiles": len(rs), "failures": len(rs) - len(ok),
            "errors": sorted({r["error"] for r in rs if not r.get("ok")})[:5],
            "spilling": len([r for r in ok if r["spill_bytes"]]),
            "spilling_configs": sorted({f"{r['variant']} {r['dtype']} sm{r['target']} {_cfg_str(r)}: "
                                        f"{r['spill_bytes']} B" for r in ok if r["spill_bytes"]})[:40],
            "max_regs": max((r["regs"] for r in ok), default=None),
            "mma_kinds": dict(mma),
            "loop_ratio_min_median_max": ([ratios[0], ratios[len(ratios) // 2], ratios[-1]] if ratios else None),
            "compile_s_total": round(sum(r["compile_s"] for r in rs), 1),
        }
        if kernel == "hash_histogram":
            out[kernel]["issue_model_estimate"] = _issue_model_summary(ok)
    return out


def _vector_channels(kernel: str, case: dict[str, Any]) -> bool:
    """Whether the main loop's operands must load as vectors: channel counts that are multiples of 8, and AlexNet's
    3-channel conv1 in the kernels with a small-C path (issue #12: zero-padded 4-channel pixels, 8-byte cp.async).
    Exempt: the degenerate 1-element extents (4 channels on a 1x1 map), which no vector fits."""
    shape = case.get("shape")
    if shape not in CONV_SHAPES or CONV_SHAPES[shape][1] % 8 == 0:
        return True
    return kernel in SMALL_C_KERNELS and shape == "alexnet_conv1_3x64_11x11s4"


def gate(records: list[dict[str, Any]]) -> list[str]:
    """The static targets of issue #12 that ``--check`` enforces (CI runs ``--plan ci --check``), one line per
    violation: a compile error; a spilling config (an autotune list must hold none); a kernel compiled without
    tensor-core instructions; 2-byte scalar loads (``LDG.E.U16``) in the main loop of a half-precision compile
    whose channel count allows vectors (fp32 with IEEE products runs on FMA units by definition). The loop-length
    ratio to the dense GEMM is reported, not enforced."""
    problems = []
    for r in records:
        name = f"{r['kernel']} [{r['variant']}] {r['dtype']} sm_{r['target']} {_cfg_str(r)}"
        if not r.get("ok"):
            problems.append(f"{name}: compile error: {r.get('error')}")
            continue
        if r["kernel"] == "dense_gemm":
            continue
        if r["spill_bytes"]:
            problems.append(f"{name}: spills {r['spill_bytes']} B (stack + local)")
        if not r["mma"] and r["dtype"] != "fp32":  # IEEE fp32 products have no tensor-core instruction
            problems.append(f"{name}: no tensor-core instruction (HMMA / HGMMA)")
        ml = r.get("main_loop") or {}
        if r["dtype"] in ("fp16", "bf16") and _vector_channels(r["kernel"], r["case"]) and \
                ml.get("ldg_bits", {}).get("16"):
            problems.append(f"{name}: {ml['ldg_bits']['16']} 2-byte scalar loads in the main loop")
    return problems


def print_summary(summary: dict[str, Any]) -> None:
    print("\nkernel            compiles  fail  spilling  max_regs  loop/dense (min med max)  mma kinds")
    for k, s in summary.items():
        ratio = " ".join(str(x) for x in s["loop_ratio_min_median_max"]) if s["loop_ratio_min_median_max"] else "-"
        print(f"{k:<17} {s['compiles']:>8}  {s['failures']:>4}  {s['spilling']:>8}  {s['max_regs'] or '-':>8}  "
              f"{ratio:<24}  {s['mma_kinds']}")
        for e in s["errors"]:
            print(f"    error: {e}")
        for key, m in s.get("issue_model_estimate", {}).items():
            print(f"    issue/read-x ESTIMATE (H200, hash_issue_model) {key}: best {m['best']} ({m['best_config']}, "
                  f"{m['best_warp_instr_per_input_element']} warp-instr per input element), worst {m['worst']}")


def tool_versions() -> dict[str, str]:
    ptxas = subprocess.run([str(TRITON_BIN / "ptxas"), "--version"], capture_output=True, text=True).stdout
    line = [ln for ln in ptxas.splitlines() if "release" in ln]
    return {"triton_version": triton.__version__, "ptxas_version": line[0].strip() if line else ptxas.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=("ci", "full"), default="ci")
    parser.add_argument("--targets", default="80,90", help="comma-separated compute capabilities")
    parser.add_argument("--out", default=None, help="JSON output (default: none for ci, bench/results/aot.json)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtypes", default=None, help="comma-separated subset of " + ",".join(DTYPES))
    parser.add_argument("--kernels", default=None, help="comma-separated subset of " + ",".join(KERNELS))
    parser.add_argument("--quiet", action="store_true", help="print the summary only, not the per-compile table")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any violation of the static targets (see gate()): compile errors, spills, "
                             "no tensor cores, 2-byte scalar main-loop loads")
    ns = parser.parse_args(argv)
    targets = [int(t) for t in ns.targets.split(",")]
    t_start = time.perf_counter()
    jobs, prune_notes = build_plan(ns.plan, targets, tuple(ns.dtypes.split(",")) if ns.dtypes else None)
    if ns.kernels:
        keep = set(ns.kernels.split(","))
        used = {_dense_key(j) for j in jobs if j["kernel"] in keep}
        jobs = [j for j in jobs if j["kernel"] in keep or (j["kernel"] == "dense_gemm" and _dense_key(j) in used)]
    # a fresh cache, so that the timings are cold compiles and never a cache hit from an earlier run
    with tempfile.TemporaryDirectory(prefix="tritonslide-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        print(f"bench.aot: plan {ns.plan}, {len(jobs)} compiles on {ns.workers} workers, targets {targets}",
              file=sys.stderr)
        if ns.workers > 1:
            with ProcessPoolExecutor(ns.workers) as pool:
                records = list(pool.map(compile_job, jobs, chunksize=1))
        else:
            records = [compile_job(j) for j in jobs]
    attach_ratios(records)
    wall = time.perf_counter() - t_start
    if not ns.quiet:
        print_table(records)
    summary = summarize(records)
    print_summary(summary)
    print(f"\n{len(records)} compiles, {sum(not r['ok'] for r in records)} failures, {wall:.0f} s wall")
    problems = gate(records)
    print(f"static targets: {len(problems)} violation(s)" + "".join(f"\n  {p}" for p in problems))
    out = ns.out or (None if ns.plan == "ci" else str(REPO_ROOT / "bench" / "results" / "aot.json"))
    if out:
        sys.path.insert(0, str(REPO_ROOT))
        from bench.utils import environment

        for r in records:
            r.pop("traceback", None) if r.get("ok") else None
        doc = {"environment": environment(), **tool_versions(), "plan": ns.plan, "targets": targets,
               "kernels": ns.kernels or "all", "workers": ns.workers, "wall_s": round(wall, 1),
               "prune": prune_notes, "main_loop_method": sass_stats.__doc__.split("\n\n")[1].strip(),
               "summary": summary, "violations": problems, "records": records}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 1 if ns.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
