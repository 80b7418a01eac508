"""Where the Triton kernel tests run: on CUDA when present (marker ``gpu``), else on CPU in Triton's interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` on machines without CUDA before any kernel file is imported,
so CI runs every kernel on small CPU shapes. The interpreter has no bf16 ``tl.dot`` and no fp16 ``atomic_add``.
"""

import contextlib
import os

import pytest
import torch

from tritonslide import kernels

if torch.cuda.is_available():
    DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)]
elif os.environ.get("TRITON_INTERPRET", "0") == "1":
    DEVICES = ["cpu"]
else:
    DEVICES = []

ON_INTERPRETER = not torch.cuda.is_available()

requires_triton = pytest.mark.skipif(
    not kernels.has_triton() or not DEVICES,
    reason="needs Triton and either a CUDA device or TRITON_INTERPRET=1",
)


def dtypes_for(device_is_interpreter: bool = ON_INTERPRETER) -> list[torch.dtype]:
    """Half-precision dtypes the kernels are tested in: the interpreter has no bf16 tl.dot."""
    return [torch.float16] if device_is_interpreter else [torch.float16, torch.bfloat16]


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` for the block, the previous setting restored after it."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
