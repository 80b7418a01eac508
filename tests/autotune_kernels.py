"""Tiny ``@tuned`` kernels for tests/test_autotune.py, in a module of their own so that a subprocess can import the
same kernels (same names, same source hashes) and read the cache the test process wrote."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonslide.kernels._autotune import tuned

BLOCKS = (16, 32, 64)  # preference order: mode "off" launches BLOCK=16
CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=1) for b in BLOCKS]


def prune_by_size(configs, nargs, **kwargs):
    """Blocks no wider than the problem (rounded up to 16): N <= 16 leaves one config. N comes as a keyword."""
    n = {**nargs, **kwargs}["N"]
    return [c for c in configs if c.kwargs["BLOCK"] <= max(16, triton.next_power_of_2(n))]


@tuned(configs=CONFIGS, key=["N"], prune_configs_by={"early_config_prune": prune_by_size})
@triton.jit
def scale_kernel(x_ptr, y_ptr, N, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)


def scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    scale_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, N=n, alpha=alpha)
    return y


# ---------------------------------------------------------------------------------------------------- hooks
HOOK_CALLS: list[int] = []  # the BLOCK of every pre_hook call


def _zero_count(nargs):
    HOOK_CALLS.append(nargs["BLOCK"])
    nargs["count_ptr"].zero_()


HOOKED_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=1, pre_hook=_zero_count) for b in BLOCKS]


@tuned(configs=HOOKED_CONFIGS, key=["N"], reset_to_zero=["sum_ptr"])
@triton.jit
def sum_kernel(x_ptr, sum_ptr, count_ptr, N, BLOCK: tl.constexpr):
    """Atomics into buffers the launcher does not zero: ``sum`` by reset_to_zero, ``count`` by the config pre_hook."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.atomic_add(sum_ptr, tl.sum(x, axis=0))
    tl.atomic_add(count_ptr, tl.sum(mask.to(tl.int32), axis=0))


def total(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    out = torch.full((1,), 123.0)  # garbage: the kernel's hooks must zero both
    count = torch.full((1,), 77, dtype=torch.int32)
    sum_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, count, n)
    return out, count


@triton.jit
def plus_one(v):
    """A helper: its source is part of ``add_one_kernel``'s source hash."""
    return v + 1.0


@tuned(configs=CONFIGS, key=["N"], restore_value=["y_ptr"])
@triton.jit
def add_one_kernel(y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(y_ptr + offs, plus_one(tl.load(y_ptr + offs, mask=mask)), mask=mask)


def add_one_(y: torch.Tensor) -> torch.Tensor:
    n = y.numel()
    add_one_kernel[(triton.cdiv(n, 16),)](y, n)  # a tuple grid; every BLOCK covers n with n/16 programs
    return y


@tuned(configs=CONFIGS, key=["N"], prune_configs_by={"early_config_prune": prune_by_size}, buckets=["N"])
@triton.jit
def bucketed_scale_kernel(x_ptr, y_ptr, N, alpha, BLOCK: tl.constexpr):
    """``scale_kernel`` keyed on N rounded up to a power of two (an active-set size that varies per batch)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)


def bucketed_scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    bucketed_scale_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, N=n, alpha=alpha)
    return y


KERNELS = (scale_kernel, sum_kernel, add_one_kernel, bucketed_scale_kernel)
