"""Helpers shared by the Triton kernel files (imports Triton: only the kernel modules import this file)."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list[triton.Config], interpreter_config: triton.Config | None = None):
    """The autotune list: all ``configs`` on a GPU, one config under the interpreter, where timing means nothing
    and every extra config would run the kernel again (Fast-LLM cuts its lists the same way)."""
    if interpreting():
        return [interpreter_config or configs[0]]
    return configs


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: "ieee" for fp32 inputs unless torch allows TF32 for matmuls, else "tf32".

    Half-precision inputs ignore it (their products are exact in fp32 accumulation)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def next_pow2(n: int, floor: int = 16) -> int:
    """The smallest power of two >= max(n, floor) (``tl.dot`` needs every tile dimension >= 16)."""
    return max(floor, triton.next_power_of_2(int(n)))
