"""GEMM building blocks shared by the Triton kernel files: ``@triton.jit`` helpers of the implicit-im2col main loops
and epilogues, and the autotune-list helpers (config factories, per-dot-kind selection, block clamping).

Imports Triton: only the kernel modules import this file (launch-side helpers live in ``_common.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2

# ---------------------------------------------------------------------------------------------------- autotune lists


def config_factory(*names: str, pre_hook=None):
    """A maker of ``triton.Config``: ``make(*tile, warps, stages)`` with ``tile`` the values of ``names`` in order
    (e.g. ``config_factory("BLOCK_M", "BLOCK_N", "BLOCK_K")(128, 64, 32, 8, 3)``)."""

    def make(*values):
        *tile, warps, stages = values
        if len(tile) != len(names):
            raise ValueError(f"config_factory{names}: got {values}")
        return triton.Config(dict(zip(names, tile)), num_warps=warps, num_stages=stages, pre_hook=pre_hook)

    return make


def fp32_fma(dtype: torch.dtype, precision: str) -> bool:
    """fp32 with IEEE products: ``tl.dot`` runs on FMA units, not tensor cores (its tiles want other configs)."""
    return dtype == torch.float32 and precision == "ieee"


def four_byte(args: dict, ptr: str) -> bool:
    """Whether the launch's ``ptr`` operand has 4-byte elements (fp32: TF32 or FMA dots, larger register tiles)."""
    return args[ptr].dtype.itemsize == 4 if hasattr(args[ptr], "dtype") else False


def dot_configs(configs: list, args: dict, ptr: str, tc: list, fma: list, tf32: list | None = None) -> list:
    """The configs of ``configs`` (by identity, in their order) that belong to this launch's kind of dot: ``fma``
    for fp32 with IEEE products (FMA dots keep both operand tiles and the accumulator in registers, so tensor-core
    tiles spill there), ``tf32`` for fp32 with TF32 products where given, else the tensor-core list ``tc``.
    ``args``: the launch's arguments (``nargs`` and the keyword ones); empty when none belongs (the interpreter's
    single config)."""
    dtype, precision = args[ptr].dtype, args["PRECISION"]
    use = tc
    if fp32_fma(dtype, precision):
        use = fma
    elif tf32 is not None and dtype == torch.float32 and precision == "tf32":
        use = tf32
    return [c for c in configs if any(c is u for u in use)]


def prune_by_dot(tc: list, fma: list, ptr: str, limits, tf32: list | None = None):
    """``early_config_prune`` of a kernel: the configs of the launch's dot kind (:func:`dot_configs`), then
    ``limits(config, args)`` drops tiles wider than the problem or too large for 4-byte operands. Never empty: the
    interpreter's single config passes through."""

    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        use = dot_configs(configs, args, ptr, tc, fma, tf32)
        kept = [c for c in use if limits(c, args)]
        return kept or use or list(configs)

    return prune


def clamp_blocks(configs, n_extent, k_extent, n_name="BLOCK_N", k_name="BLOCK_K"):
    """Shrink BLOCK_N / BLOCK_K to the active extents (>= 16 for tl.dot) and drop the duplicates this creates.

    A clamped (n x k) operand tile that gives each thread fewer than two elements (16 x 16 over 8 warps) is loaded
    one 2-byte scalar per thread (bench.aot): such configs are dropped while a config with fewer warps remains."""
    n_cap, k_cap = next_pow2(n_extent), next_pow2(k_extent)
    seen, out, thin = set(), [], []
    for cfg in configs:
        kw = dict(cfg.kwargs)
        kw[n_name] = min(kw[n_name], n_cap)
        kw[k_name] = min(kw[k_name], k_cap)
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key in seen:
            continue
        seen.add(key)
        new = triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages, pre_hook=cfg.pre_hook)
        (thin if kw[n_name] * kw[k_name] < 2 * 32 * cfg.num_warps else out).append(new)
    return out or thin


# ---------------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def load_index(idx_ptr, offs, mask, HAS_INDEX: tl.constexpr):
    """``idx[offs]`` (int32: the launchers pass index sets as int32), or ``offs`` itself when the set is "all"."""
    if HAS_INDEX:
        return tl.load(idx_ptr + offs, mask=mask, other=0)
    else:
        return offs


@triton.jit
def valid_count(count_ptr, N_TOTAL, HAS_COUNT: tl.constexpr):
    """How many entries of ``out_idx`` are in use: ``out_count`` clamped to [0, len(out_idx)], else all of them."""
    if HAS_COUNT:
        return tl.minimum(tl.maximum(tl.load(count_ptr).to(tl.int32), 0), N_TOTAL)
    else:
        return N_TOTAL


@triton.jit
def store_tile(row_ptrs, col_offs, value, row_mask, col_mask, ROWS_CONTIGUOUS: tl.constexpr):
    """Store the (R, C) ``value`` at ``row_ptrs[:, None] + col_offs[None, :]``; rows fastest when contiguous (an
    NCHW output: positions are its contiguous axis), else columns (channels of an NHWC output)."""
    if ROWS_CONTIGUOUS:
        tl.store(row_ptrs[None, :] + col_offs[:, None], tl.trans(value), mask=row_mask[None, :] & col_mask[:, None])
    else:
        tl.store(row_ptrs[:, None] + col_offs[None, :], value, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def next_step(r, s, c0, EXTENT, KW, BLOCK: tl.constexpr):
    """The step after (tap row r, tap column s, chunk start c0) of a flat (tap, chunk) reduction loop: the next
    chunk of ``EXTENT`` channels / filters, else the next tap (``KW`` taps per row: a constexpr, or the runtime tap
    count of a stride phase). Scalar selects carried by the loop; deriving the three from the step number costs a
    division by the runtime chunk count (I2F / MUFU.RCP / F2I in SASS)."""
    c0 += BLOCK
    wrap = c0 >= EXTENT
    c0 = tl.where(wrap, 0, c0)
    s = tl.where(wrap, s + 1, s)
    wrap_s = s == KW
    s = tl.where(wrap_s, 0, s)
    r = tl.where(wrap_s, r + 1, r)
    return r, s, c0


@triton.jit
def phase_taps(ph, K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, D: tl.constexpr, TAP: tl.constexpr):
    """The taps of one stride phase of a transposed convolution along one axis (stride S > 1, padding P, dilation
    D, K taps): the input positions ``ph + i S`` receive from the taps ``t`` with ``(ph + P - t D) % S == 0``, i.e.
    ``first, first + TAP, ...`` (``TAP = S / gcd(S, D)``, from the launcher). Returns (how many, first, the dy offset
    ``(ph + P - first D) / S`` of the first: exact); tap k of the phase reads dy row ``i + q0 - k TAP D / S``. A
    phase that no tap reaches has 0 taps (its positions get zeros)."""
    tl.static_assert((TAP * D) % S == 0)
    first = ph * 0 + K
    for u in tl.static_range(TAP):  # downwards (tap TAP - 1 - u): the smallest hit is the last one kept
        # a negative dividend leaves a nonzero remainder in C and Python alike
        first = tl.where((ph + P - (TAP - 1 - u) * D) % S == 0, TAP - 1 - u, first)
    n = tl.where(first < K, (K - first + TAP - 1) // TAP, 0)
    return n, first, (ph + P - first * D) // S  # exact: truncating and floor division agree


@triton.jit
def inside(i, n):
    """``0 <= i < n`` in one unsigned comparison (a negative i wraps to a huge unsigned value; the int32 ``n``
    promotes to uint32). ``n`` may be a constexpr: Triton's launcher specializes an integer argument equal to 1."""
    return i.to(tl.uint32, bitcast=True) < n


@triton.jit
def positions(offs_m, OH, OW):
    """Output position m -> (n as int64, oh, ow); n in int64 so that n * stride_n cannot overflow."""
    n = offs_m // (OH * OW)
    rem = offs_m - n * (OH * OW)
    oh = rem // OW
    ow = rem - oh * OW
    return n.to(tl.int64), oh, ow
