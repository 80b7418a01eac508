"""Triton kernels of tritonslide, installed as ``tritonslide.kernels``.

Triton is optional: it is imported here behind a guard so that ``import tritonslide`` works where it is missing
(macOS, Windows, minimal containers). Nothing outside this package imports ``triton``; the op layer
(``tritonslide.ops``) asks :func:`has_triton` and :func:`get_kernel` and falls back to
``tritonslide.cpu_fallback`` where the Triton path cannot run.

``TRITON_OPS`` names the ops that have a Triton implementation. An op missing from it raises
``NotImplementedError`` when the Triton backend is forced for it, and the ``auto`` backend never picks Triton
for it, so users on a GPU get the correct torch path until the kernel lands.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from typing import Callable

# op name -> (module inside tritonslide.kernels, issue that brings it)
_PLANNED = {
    "hash_histogram": ("hash_histogram", 4),
    "active_conv2d": ("active_conv2d", 5),
    "active_conv2d_backward": ("active_conv2d", 5),
    "sketch_conv2d": ("sketch", 6),
    "sketch_conv2d_backward": ("sketch", 6),
    "sketch_linear": ("sketch", 6),
    "sketch_linear_backward": ("sketch", 6),
    "sample_conv2d": ("sample_conv2d", 15),
    "sample_conv2d_backward": ("sample_conv2d", 15),
}



def _present(module: str) -> bool:
    # find_spec on a submodule imports only this package (already imported), never the kernel file or triton.
    return importlib.util.find_spec(f"{__name__}.{module}") is not None


# Ops whose Triton launcher exists in this package: a planned op counts once its kernel file is installed.
TRITON_OPS: frozenset[str] = frozenset(op for op, (module, _) in _PLANNED.items() if _present(module))


# Whether a ``triton`` package is installed, probed without importing it (importing costs ~0.3 s and may fail).
TRITON_FOUND: bool = importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=1)
def has_triton() -> bool:
    """True when the ``triton`` package can be imported (it is never imported before this is asked)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # a broken install (missing libcuda stubs, ABI mismatch) counts as absent
        return False
    return True


def get_kernel(op: str) -> Callable:
    """The Triton launcher of ``op``; raises ``NotImplementedError`` naming the op when it has none yet."""
    if op not in TRITON_OPS:
        issue = _PLANNED.get(op, (None, None))[1]
        where = f" (planned in issue #{issue})" if issue else ""
        raise NotImplementedError(
            f"tritonslide.ops.{op}: the Triton kernel is not implemented yet{where}; "
            "use tritonslide.use_backend('torch') or 'auto' to run the PyTorch fallback"
        )
    module_name, _ = _PLANNED[op]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, f"{op}_forward" if not op.endswith("_backward") else op)
