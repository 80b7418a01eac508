"""The one place where a backend is chosen for an op (STYLE.md, practice 3).

Order of precedence: the innermost :func:`use_backend` in effect, else the ``TRITONSLIDE_BACKEND`` environment
variable, else ``"auto"``. ``auto`` runs Triton for CUDA tensors when Triton is installed and the op has a Triton
kernel, and the PyTorch fallback otherwise. ``"triton"`` forces the Triton kernels (on CUDA, or on CPU tensors
when ``TRITON_INTERPRET=1`` runs them in Triton's interpreter) and raises where that cannot run; ``"torch"``
forces the fallback everywhere.
"""

from __future__ import annotations

import contextvars
import os
from typing import Literal

import torch

from tritonslide import kernels

BackendName = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

_CHOICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("tritonslide_backend", default=None)


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


class use_backend:  # noqa: N801 - used like a function, as torch.no_grad is
    """Choose the backend of every tritonslide op.

    Works as a context manager (``with tritonslide.use_backend("torch"): ...``), restoring the previous choice on
    exit, and as a plain call (``tritonslide.use_backend("triton")``), which stays in effect for the current
    thread / context until changed again.
    """

    def __init__(self, name: BackendName) -> None:
        self.name = _validate(name, "tritonslide.use_backend")
        self._token = _CHOICE.set(self.name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _CHOICE.reset(self._token)


def current_backend() -> str:
    """The backend choice in effect: ``"auto"``, ``"torch"`` or ``"triton"``."""
    choice = _CHOICE.get()
    if choice is not None:
        return choice
    return _validate(os.environ.get("TRITONSLIDE_BACKEND", "auto"), "TRITONSLIDE_BACKEND")


# dtypes the Triton kernels are written for (fp32 accumulation); float64 always runs the PyTorch fallback.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op: str, tensor: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for ``op`` on ``tensor``; raise if a forced choice cannot run."""
    choice = current_backend()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and op in kernels.TRITON_OPS and kernels.has_triton():
            return "triton"
        return "torch"
    # forced triton
    if not kernels.has_triton():
        raise RuntimeError(f"tritonslide.ops.{op}: backend 'triton' was requested but Triton is not installed")
    if not (tensor.is_cuda or triton_interpret()):
        raise RuntimeError(
            f"tritonslide.ops.{op}: backend 'triton' was requested for a tensor on {tensor.device}; "
            "Triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1"
        )
    kernels.get_kernel(op)  # raises NotImplementedError naming the op when it has no kernel yet
    if tensor.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in KERNEL_DTYPES)
        raise TypeError(f"tritonslide.ops.{op}: the Triton kernels take {names} inputs, got {tensor.dtype}; "
                        "use tritonslide.use_backend('torch') for it")
    return "triton"
