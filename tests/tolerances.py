"""Tolerances per dtype, kept as data (FlagGems' testing/__init__.py keeps them as a table).

``atol`` grows with the square root of the reduction length (a sum of ``n`` rounded products has an error of
about ``sqrt(n) * eps`` in the random-walk model), so one table serves 1x1 and 11x11 kernels alike.
"""

import math

import torch

# dtype: (rtol, atol per unit of sqrt(reduction length))
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 2e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def tol(dtype: torch.dtype, reduction: int = 1) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol * math.sqrt(max(reduction, 1))}


def assert_close(actual, expected, dtype=None, reduction=1, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol(dtype, reduction), msg=msg or None)
