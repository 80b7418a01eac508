"""The one place where a backend is chosen for an op (STYLE.md, practice 3).

Order of precedence: the innermost :func:`use_backend` in effect, else the ``TRITONSLIDE_BACKEND`` environment
variable, else ``"auto"``. The choice is process-wide, as ``torch.backends`` flags are: it is kept in a plain
module global, which ``torch.compile`` reads while tracing and guards on, so a compiled model traced under one
choice recompiles under another and the choice never breaks a graph (a ``contextvars.ContextVar`` did: Dynamo
cannot trace ``ContextVar.get``). The environment variable is read when an op is traced and not guarded on.

``auto`` runs Triton for CUDA tensors when Triton is installed and the op has a Triton kernel, and the PyTorch
fallback otherwise. ``"triton"`` forces the Triton kernels (on CUDA, or on CPU tensors
when ``TRITON_INTERPRET=1`` runs them in Triton's interpreter) and raises where that cannot run; ``"torch"``
forces the fallback everywhere.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from tritonslide import kernels

BackendName = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

# the innermost use_backend in effect (None: none); a list so that nested contexts restore in order
_CHOICE: list[str | None] = [None]


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


class use_backend:  # noqa: N801 - used like a function, as torch.no_grad is
    """Choose the backend of every tritonslide op.

    Works as a context manager (``with tritonslide.use_backend("torch"): ...``), restoring the previous choice on
    exit, and as a plain call (``tritonslide.use_backend("triton")``), which stays in effect for the process until
    changed again. Process-wide (every thread sees it), like ``torch.backends.cudnn.enabled``.
    """

    def __init__(self, name: BackendName) -> None:
        self.name = _validate(name, "tritonslide.use_backend")
        self._previous = _CHOICE[0]
        _CHOICE[0] = self.name

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _CHOICE[0] = self._previous


def current_backend() -> str:
    """The backend choice in effect: ``"auto"``, ``"torch"`` or ``"triton"``."""
    choice = _CHOICE[0]
    if choice is not None:
        return choice
    return _validate(os.environ.get("TRITONSLIDE_BACKEND", "auto"), "TRITONSLIDE_BACKEND")


# dtypes the Triton kernels are written for (fp32 accumulation); float64 always runs the PyTorch fallback.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op: str, tensor: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for ``op`` on ``tensor``; raise if a forced choice cannot run.

    The op layer passes ``"auto"`` instead of ``"triton"`` to the op's implementation when the choice was
    ``auto``: it then checks at run time that Triton imports and (active_conv2d) this GPU's measured table."""
    choice = current_backend()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        # TRITON_FOUND: Triton is installed (a constant probed without importing it, so this line traces); whether
        # it imports is checked by the op's implementation at run time, which falls back to torch if not
        if tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and op in kernels.TRITON_OPS and kernels.TRITON_FOUND:
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
    if op not in kernels.TRITON_OPS:
        kernels.get_kernel(op)  # raises NotImplementedError naming the op
    if tensor.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in KERNEL_DTYPES)
        raise TypeError(f"tritonslide.ops.{op}: the Triton kernels take {names} inputs, got {tensor.dtype}; "
                        "use tritonslide.use_backend('torch') for it")
    return "triton"
