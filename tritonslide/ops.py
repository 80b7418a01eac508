"""The op layer: ``tritonslide.ops.<op>``, one backend choice per call, one autograd Function per op.

Every op checks its arguments here, asks :func:`tritonslide._backend.resolve_backend` for ``"torch"`` or
``"triton"``, and runs ``tritonslide.cpu_fallback.torch_<op>`` or the Triton launcher of ``tritonslide.kernels``.
Nothing below this layer sees a module, a config or a hash-table object: only tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.modules.utils import _pair

from tritonslide import _dispatch, kernels
from tritonslide._backend import current_backend, resolve_backend
from tritonslide.cpu_fallback import (
    torch_active_conv2d,
    torch_active_conv2d_backward,
    torch_alsh_active_set,
    torch_hash_histogram,
    torch_sketch_conv2d,
    torch_sketch_conv2d_backward,
    torch_sketch_linear,
    torch_sketch_linear_backward,
)

IntPair = int | Sequence[int]

# Histograms have L * 2**bits int64 entries and codes are packed in int32 lanes.
MAX_BITS = 24


def _conv_args(name: str, stride: IntPair, padding: IntPair, dilation: IntPair):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    for label, value, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(value) != 2 or any((not isinstance(v, int)) or v < low for v in value):
            raise ValueError(f"{name}: {label} must be an int or a pair of ints >= {low}, got {value!r}")
    return tuple(stride), tuple(padding), tuple(dilation)


def _check_x(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point x, got {x.dtype}")


def _check_index(
    name: str, label: str, idx: torch.Tensor | None, size: int, device: torch.device, sorted_unique: bool = True
) -> None:
    """Index tensors must be 1-d int64, on x's device, unique, sorted and inside [0, size).

    Values are checked on CPU only: on CUDA the check would cost a device-to-host sync on every call.
    """
    if idx is None:
        return
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{name}: expected {label} to be a 1-d int64 tensor, got {got}")
    if idx.device != device:
        raise ValueError(f"{name}: {label} is on {idx.device} but x is on {device}")
    if sorted_unique and idx.numel() > size:
        raise ValueError(f"{name}: {label} has {idx.numel()} entries but there are only {size} channels")
    if idx.device.type == "cpu" and idx.numel() > 0:
        if int(idx.min()) < 0 or int(idx.max()) >= size:
            lo, hi = int(idx.min()), int(idx.max())
            raise ValueError(f"{name}: {label} must lie in [0, {size}), got values in [{lo}, {hi}]")
        if sorted_unique and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"{name}: {label} must be sorted and unique (as torch.unique returns it)")


def _check_count(name: str, out_idx, out_count, compact_output: bool, size: int, device: torch.device) -> None:
    """``out_count`` with a padded ``out_idx``: the first ``out_count`` entries are sorted unique active rows."""
    if compact_output:
        raise ValueError(f"{name}: out_count needs compact_output=False (the output shape would depend on the count)")
    if out_idx is None:
        raise ValueError(f"{name}: out_count needs out_idx (its first out_count entries are the active rows)")
    if not isinstance(out_count, torch.Tensor) or out_count.numel() != 1 or out_count.dtype != torch.int64:
        got = f"{out_count.dtype} tensor of shape {tuple(out_count.shape)}" if isinstance(out_count, torch.Tensor) \
            else type(out_count).__name__
        raise TypeError(f"{name}: expected out_count to be a 0-d int64 tensor, got {got}")
    if out_count.device != device:
        raise ValueError(f"{name}: out_count is on {out_count.device} but x is on {device}")
    _check_index(name, "out_idx", out_idx, size, device, sorted_unique=False)
    if device.type == "cpu":
        count = int(out_count)
        if not 0 <= count <= out_idx.numel():
            raise ValueError(f"{name}: out_count={count} must lie in [0, len(out_idx)={out_idx.numel()}]")
        _check_index(name, "out_idx[:out_count]", out_idx[:count], size, device)


def hash_histogram(
    x: torch.Tensor,
    planes: torch.Tensor,
    bits: int,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    in_idx: torch.Tensor | None = None,
    return_codes: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hyperplane-hash every im2col patch of ``x`` and count the codes per table.

    ``planes``: (L*bits, C, kh, kw). For every patch ``p`` of the batch (the columns of im2col with this
    stride / padding / dilation) bit ``j`` of table ``t`` is ``[<planes[t*bits+j], p> >= 0]`` and the table's
    code is ``sum_j bit_j << j`` (Feeney 2019, eq. 3.3-3.4). Returns the (L, 2**bits) int64 histogram of codes
    over all patches of the batch, and the (N, L, H', W') int64 codes when ``return_codes``. With ``in_idx`` the
    projection reads only those input channels, which equals hashing ``x`` with the other channels zeroed.
    Not differentiable (its outputs are integers).
    """
    name = "tritonslide.ops.hash_histogram"
    _check_x(name, x)
    stride, padding, dilation = _conv_args(name, stride, padding, dilation)
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{name}: bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    if not isinstance(planes, torch.Tensor) or planes.dim() != 4:
        got = tuple(planes.shape) if isinstance(planes, torch.Tensor) else type(planes).__name__
        raise ValueError(f"{name}: expected planes of shape (L*bits, C, kh, kw), got {got}")
    if planes.shape[0] == 0 or planes.shape[0] % bits:
        raise ValueError(f"{name}: planes.shape[0]={planes.shape[0]} must be a positive multiple of bits={bits}")
    if planes.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: planes have {planes.shape[1]} input channels but x has {x.shape[1]}")
    if planes.device != x.device:
        raise ValueError(f"{name}: planes are on {planes.device} but x is on {x.device}")
    _check_index(name, "in_idx", in_idx, x.shape[1], x.device)
    if resolve_backend("hash_histogram", x) == "triton":
        return kernels.get_kernel("hash_histogram")(x, planes, bits, stride, padding, dilation, in_idx, return_codes)
    return torch_hash_histogram(x, planes, bits, stride, padding, dilation, in_idx, return_codes)


def alsh_active_set(
    hist: torch.Tensor, filter_codes: torch.Tensor, top_buckets: int, min_active: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ALSH active set of one step, chosen on ``hist``'s device with no host synchronization.

    ``hist``: (L, 2**K) int64 query histogram (:func:`hash_histogram`); ``filter_codes``: (O, L) int64 codes of
    the filters. Per table the ``top_buckets`` most frequent codes are taken (ties to the lower code); a filter is
    active when its code in any table is among them (Feeney 2019, sec. 4.2 and Alg. 4); at least ``min_active``
    filters are kept (the most voted ones). Returns ``(idx, count)``: an (O,) int64 buffer whose first ``count``
    entries are the active filters in ascending order (the rest: the inactive ones) and a 0-d int64 ``count``,
    both on the device, so that a kernel can consume the set without the host reading its size.
    ``idx[:count]`` (one synchronization on CUDA) is the sorted index tensor the other ops take.
    """
    name = "tritonslide.ops.alsh_active_set"
    if not isinstance(hist, torch.Tensor) or hist.dim() != 2 or hist.dtype != torch.int64:
        got = f"{hist.dtype} tensor of shape {tuple(hist.shape)}" if isinstance(hist, torch.Tensor) else type(hist)
        raise TypeError(f"{name}: expected hist to be an (L, 2**K) int64 tensor, got {got}")
    if not isinstance(filter_codes, torch.Tensor) or filter_codes.dim() != 2 or filter_codes.dtype != torch.int64:
        got = (f"{filter_codes.dtype} tensor of shape {tuple(filter_codes.shape)}"
               if isinstance(filter_codes, torch.Tensor) else type(filter_codes))
        raise TypeError(f"{name}: expected filter_codes to be an (O, L) int64 tensor, got {got}")
    if filter_codes.shape[1] != hist.shape[0]:
        raise ValueError(f"{name}: filter_codes has {filter_codes.shape[1]} tables but hist has {hist.shape[0]}")
    if filter_codes.device != hist.device:
        raise ValueError(f"{name}: filter_codes are on {filter_codes.device} but hist is on {hist.device}")
    n_buckets = hist.shape[1]
    if n_buckets == 0 or n_buckets & (n_buckets - 1):
        raise ValueError(f"{name}: hist must have 2**K columns, got {n_buckets}")
    for label, value, low in (("top_buckets", top_buckets, 1), ("min_active", min_active, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: {label} must be an int >= {low}, got {value!r}")
    if filter_codes.device.type == "cpu" and filter_codes.numel():
        lo, hi = int(filter_codes.min()), int(filter_codes.max())
        if lo < 0 or hi >= n_buckets:
            raise ValueError(f"{name}: filter_codes must lie in [0, {n_buckets}), got values in [{lo}, {hi}]")
    return torch_alsh_active_set(hist, filter_codes, top_buckets, min_active)


class ActiveConv2dFunction(torch.autograd.Function):
    """Autograd of :func:`active_conv2d`; the backend was chosen by the op and is kept for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_idx, in_idx, out_count, stride, padding, dilation, compact, backend):
        if backend == "triton":
            fwd = kernels.get_kernel("active_conv2d")
            y = fwd(x, weight, bias, out_idx, in_idx, stride, padding, dilation, *compact, out_count=out_count)
        else:
            if out_count is not None:  # the fallback takes the exact set (on CUDA this reads the count: one sync)
                out_idx, out_count = out_idx[: int(out_count)], None
            y = torch_active_conv2d(x, weight, bias, out_idx, in_idx, stride, padding, dilation, *compact)
        ctx.save_for_backward(x, weight, out_idx, in_idx, out_count)
        ctx.conf = (bias is not None, stride, padding, dilation, compact, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, out_idx, in_idx, out_count = ctx.saved_tensors
        has_bias, stride, padding, dilation, compact, backend = ctx.conf
        needs = tuple(ctx.needs_input_grad[:3])
        if backend == "triton":
            bwd = kernels.get_kernel("active_conv2d_backward")
            dx, dw, db = bwd(grad_y, x, weight, has_bias, out_idx, in_idx, stride, padding, dilation, needs, *compact,
                             out_count=out_count)
        else:
            dx, dw, db = torch_active_conv2d_backward(
                grad_y, x, weight, has_bias, out_idx, in_idx, stride, padding, dilation, needs, *compact
            )
        return dx, dw, db, None, None, None, None, None, None, None, None


def active_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    in_idx: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    compact_input: bool = False,
    compact_output: bool = False,
    out_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolution restricted to the active filters ``out_idx`` and the active input channels ``in_idx``.

    Equals ``F.conv2d(x * m_in, weight, bias) * m_out`` (``m`` the 0/1 channel masks of the index sets; the bias
    only on active channels) while computing only rows ``out_idx`` and reading only channels ``in_idx``
    (Feeney 2019, Alg. 4 and 6). Backward: gradients for the active rows only (zeros elsewhere), ``dx`` through the
    active filters into the active input channels (Alg. 5). ``None`` means all. Indices: sorted unique int64.

    Compact forms (Alg. 6 hands the next layer the active channels alone): ``compact_input`` means ``x`` holds
    only the channels ``in_idx`` (N, len(in_idx), H, W), and its gradient comes back in that form;
    ``compact_output`` returns only the rows ``out_idx`` (N, len(out_idx), H', W'). Same values, no zero channels.

    Device-side active sets: with ``out_count`` (0-d int64 tensor, e.g. from :func:`alsh_active_set`) only the first
    ``out_count`` entries of ``out_idx`` are the active rows and the rest is padding; the Triton kernels read the
    count on the device, so the host never waits for the size of the set (the PyTorch fallback slices the set,
    which reads the count). Not with ``compact_output``, whose shape would depend on the count.
    """
    name = "tritonslide.ops.active_conv2d"
    _check_x(name, x)
    stride, padding, dilation = _conv_args(name, stride, padding, dilation)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{name}: expected weight of shape (O, C, kh, kw), got {getattr(weight, 'shape', weight)}")
    if compact_input and in_idx is None:
        raise ValueError(f"{name}: compact_input=True needs in_idx (the channels x holds)")
    expected_c = in_idx.numel() if compact_input else weight.shape[1]
    if x.shape[1] != expected_c:
        what = f"len(in_idx)={expected_c}" if compact_input else f"{expected_c} input channels"
        raise ValueError(f"{name}: weight expects {what} but x has {x.shape[1]}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"{name}: weight is {weight.dtype} on {weight.device} but x is {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"{name}: expected bias of shape ({weight.shape[0]},) and dtype {x.dtype}, got {bias.shape}")
    if out_count is None:
        _check_index(name, "out_idx", out_idx, weight.shape[0], x.device)
    else:
        _check_count(name, out_idx, out_count, compact_output, weight.shape[0], x.device)
    _check_index(name, "in_idx", in_idx, weight.shape[1], x.device)
    for label, size, extent in (("height", x.shape[2], weight.shape[2]), ("width", x.shape[3], weight.shape[3])):
        i = 0 if label == "height" else 1
        if size + 2 * padding[i] < dilation[i] * (extent - 1) + 1:
            raise ValueError(f"{name}: input {label} {size} (padded {size + 2 * padding[i]}) is smaller than the "
                             f"dilated kernel extent {dilation[i] * (extent - 1) + 1}")
    backend = resolve_backend("active_conv2d", x)
    if (backend == "triton" and out_count is None and current_backend() == "auto"
            and _dispatch.has_measurements("active_conv2d", x.device)):
        # where this GPU's measurements found the torch path faster for this shape, take it (tritonslide/_dispatch.py)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias)
        )
        key = _dispatch.conv_key(x, weight, stride, padding, dilation, needs_grad)
        fraction = 1.0 if out_idx is None else out_idx.numel() / weight.shape[0]
        backend = _dispatch.measured_backend("active_conv2d", x.device, key, fraction) or backend
    compact = (bool(compact_input), bool(compact_output))
    return ActiveConv2dFunction.apply(
        x, weight, bias, out_idx, in_idx, out_count, stride, padding, dilation, compact, backend
    )


def _check_factor(name: str, label: str, t, x: torch.Tensor, dims: int, expected: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected {label} of shape {expected}, got {got}")
    if t.dtype != x.dtype or t.device != x.device:
        raise TypeError(f"{name}: {label} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


def _check_bias(name: str, bias, o: int, x: torch.Tensor) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (o,) or bias.dtype != x.dtype):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{name}: expected bias of shape ({o},) and dtype {x.dtype}, got {got}")


class SketchConv2dFunction(torch.autograd.Function):
    """Autograd of :func:`sketch_conv2d`; keeps ``z = conv(x, A)`` (N, r, H', W') for the backward pass."""

    @staticmethod
    def forward(ctx, x, a, b, bias, out_idx, stride, padding, dilation, backend):
        fwd = kernels.get_kernel("sketch_conv2d") if backend == "triton" else torch_sketch_conv2d
        y, z = fwd(x, a, b, bias, out_idx, stride, padding, dilation)
        ctx.save_for_backward(x, a, b, z, out_idx)
        ctx.conf = (bias is not None, stride, padding, dilation, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, a, b, z, out_idx = ctx.saved_tensors
        has_bias, stride, padding, dilation, backend = ctx.conf
        bwd = kernels.get_kernel("sketch_conv2d_backward") if backend == "triton" else torch_sketch_conv2d_backward
        grads = bwd(grad_y, x, a, b, z, has_bias, out_idx, stride, padding, dilation, tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None, None, None, None)


def sketch_conv2d(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Sketch-then-unsketch convolution: ``y = conv2d(conv2d(x, A), B[:, :, None, None]) + bias``.

    ``A``: (r, C, kh, kw), ``B``: (O, r). Equals ``conv2d(x, (B @ A.flatten(1)).view(O, C, kh, kw), bias)`` without
    forming that weight (Kasiviswanathan et al., eq. 2: every SK-CONV term is one such chain, the terms
    concatenated along r). Only the rows ``out_idx`` of ``B`` are computed; other output channels are zero and
    get zero gradients in ``B`` and ``bias`` (as in :func:`active_conv2d`). Differentiable in x, A, B and bias.
    """
    name = "tritonslide.ops.sketch_conv2d"
    _check_x(name, x)
    stride, padding, dilation = _conv_args(name, stride, padding, dilation)
    _check_factor(name, "A", a, x, 4, "(r, C, kh, kw)")
    _check_factor(name, "B", b, x, 2, "(O, r)")
    if a.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: A expects {a.shape[1]} input channels but x has {x.shape[1]}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"{name}: B has {b.shape[1]} columns but A has r={a.shape[0]} rows")
    _check_bias(name, bias, b.shape[0], x)
    _check_index(name, "out_idx", out_idx, b.shape[0], x.device)
    for i, label in ((0, "height"), (1, "width")):
        extent = dilation[i] * (a.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < extent:
            raise ValueError(f"{name}: input {label} {x.shape[2 + i]} (padded {x.shape[2 + i] + 2 * padding[i]}) "
                             f"is smaller than the dilated kernel extent {extent}")
    backend = resolve_backend("sketch_conv2d", x)
    return SketchConv2dFunction.apply(x, a, b, bias, out_idx, stride, padding, dilation, backend)


class SketchLinearFunction(torch.autograd.Function):
    """Autograd of :func:`sketch_linear`; keeps ``z = x A^T`` for the backward pass."""

    @staticmethod
    def forward(ctx, x, a, b, bias, out_idx, backend):
        fwd = kernels.get_kernel("sketch_linear") if backend == "triton" else torch_sketch_linear
        y, z = fwd(x, a, b, bias, out_idx)
        ctx.save_for_backward(x, a, b, z, out_idx)
        ctx.conf = (bias is not None, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, a, b, z, out_idx = ctx.saved_tensors
        has_bias, backend = ctx.conf
        bwd = kernels.get_kernel("sketch_linear_backward") if backend == "triton" else torch_sketch_linear_backward
        grads = bwd(grad_y, x, a, b, z, has_bias, out_idx, tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None)


def sketch_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sketch-then-unsketch linear map: ``y = (x A^T) B^T + bias`` with A (r, in), B (out, r), x (..., in).

    Equals ``F.linear(x, B @ A, bias)`` without forming ``B @ A`` (SK-FC, Kasiviswanathan et al., eq. 4). Only
    the rows ``out_idx`` of ``B`` are computed; other outputs are zero. Differentiable in x, A, B and bias.
    """
    name = "tritonslide.ops.sketch_linear"
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: expected a floating-point x of shape (..., in), got {got}")
    _check_factor(name, "A", a, x, 2, "(r, in)")
    _check_factor(name, "B", b, x, 2, "(out, r)")
    if a.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: A expects {a.shape[1]} input features but x has {x.shape[-1]}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"{name}: B has {b.shape[1]} columns but A has r={a.shape[0]} rows")
    _check_bias(name, bias, b.shape[0], x)
    _check_index(name, "out_idx", out_idx, b.shape[0], x.device)
    backend = resolve_backend("sketch_linear", x)
    return SketchLinearFunction.apply(x, a, b, bias, out_idx, backend)


__all__ = [
    "ActiveConv2dFunction",
    "SketchConv2dFunction",
    "SketchLinearFunction",
    "active_conv2d",
    "alsh_active_set",
    "hash_histogram",
    "sketch_conv2d",
    "sketch_linear",
]
