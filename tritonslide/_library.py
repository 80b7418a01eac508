"""Every op of :mod:`tritonslide.ops` as a registered PyTorch custom op (``torch.ops.tritonslide.<op>``).

Registered with ``torch.library.custom_op``: each op has its implementation (the PyTorch fallback or the Triton
launcher, chosen by the ``backend`` argument the op layer resolved), a fake implementation (shapes, dtypes and
memory formats only, for ``torch.compile``, ``torch.export`` and meta tensors) and, where differentiable, an
autograd formula whose backward is itself a custom op. ``torch.compile`` therefore traces a patched model into
one graph: each op is a single opaque node, never a graph break.

Data-dependent sizes: :func:`active_indices` (the exact ALSH active set, ``idx[:count]``) has an output whose
length depends on the data; its fake implementation gives it an unbacked symbolic size bounded by ``len(idx)``,
so the compact hand-off of linked ALSH layers (Feeney 2019, Alg. 6) traces with a symbolic channel count.

Implementations run with autocast disabled: the op layer already cast the operands to the dtype the op computes
in, and the fallback's internal casts (hashing in float32) must not be undone by an enclosing autocast region.
Value checks that read tensor data (index ranges, sortedness, counts) happen here, at run time, on CPU tensors
only: in the op layer they would read data while tracing, and on CUDA they would cost a synchronization.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from tritonslide import _dispatch, kernels
from tritonslide.cpu_fallback import (
    torch_active_conv2d,
    torch_active_conv2d_backward,
    torch_alsh_active_set,
    torch_hash_histogram,
    torch_hash_histogram_rows,
    torch_sample_conv2d,
    torch_sample_conv2d_backward,
    torch_sketch_conv2d,
    torch_sketch_conv2d_backward,
    torch_sketch_linear,
    torch_sketch_linear_backward,
)
from tritonslide.cpu_fallback._format import is_channels_last
from tritonslide.cpu_fallback._rows import expand_rows
from tritonslide.cpu_fallback._rows import rows_valid as _rows_valid
from tritonslide.cpu_fallback.sample_conv2d import _gather_channels

NS = "tritonslide"
_C = torch.contiguous_format  # the layout of weight, factor and bias gradients


# ---------------------------------------------------------------------- shared helpers
def _no_autocast(device_type: str):
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# Tensor types the eager path calls the implementations with directly (FakeTensor, FunctionalTensor and other
# subclasses go through the registered op, whose fake implementation and dispatch they need).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may skip the custom op's dispatch and run its implementation (and, for the differentiable
    ops, its eager autograd Function) directly: outside ``torch.compile`` / ``torch.export`` tracing, on plain
    tensors. The dispatch costs ~120-180 us per call here (CPU, torch 2.13: ``torch.ops.tritonslide.active_conv2d``
    293 us vs its implementation 175 us on a 2x8x8x8 input; ``alsh_active_set`` 307 vs 230 us), more than a small
    layer's kernels take on a GPU."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _call(op, impl, *args):
    return impl(*args) if eager(*(a for a in args if isinstance(a, Tensor))) else op(*args)


def _fmt(x: Tensor) -> torch.memory_format:
    """Memory format of an op's outputs: channels_last when its input is (as F.conv2d does)."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _like(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` laid out as the fake implementation promised (a no-op when it already is)."""
    if t.dim() != 4:
        return t.contiguous()
    return t.contiguous(memory_format=fmt)


def _empty(like: Tensor) -> Tensor:
    # the placeholder for a gradient that was not asked for (custom ops return tensors, not None)
    return like.new_empty(0)


def _grads(*pairs: tuple[Optional[Tensor], Tensor, torch.memory_format]) -> tuple[Tensor, ...]:
    """A backward op's outputs: each gradient laid out as its fake promised, an empty tensor where not asked for."""
    return tuple(_empty(like) if g is None else _like(g, fmt) for g, like, fmt in pairs)


def _fake_grads(needs: Sequence[bool], *pairs: tuple[Tensor, torch.memory_format]) -> tuple[Tensor, ...]:
    """The fake of a backward op: a gradient shaped like its input where ``needs`` says so (the bias gradient,
    given as the (O,)-shaped ``like``, follows the same rule)."""
    return tuple(torch.empty_like(like, memory_format=fmt) if need else _empty(like)
                 for need, (like, fmt) in zip(needs, pairs))


def _conv_hw(h, w, kh, kw, stride, padding, dilation):
    return (
        (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
        (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1,
    )


def _runtime_backend(backend: str) -> str:
    """``"auto"`` (the op layer found Triton installed for a CUDA tensor) runs Triton when it imports here."""
    if backend == "auto":
        return "triton" if kernels.has_triton() else "torch"
    return backend


def check_index_values(name: str, label: str, idx: Optional[Tensor], size: int, sorted_unique: bool = True) -> None:
    """Index values inside [0, size) and (``sorted_unique``) strictly increasing; CPU tensors only."""
    if idx is None or idx.device.type != "cpu" or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name}: {label} must lie in [0, {size}), got values in [{lo}, {hi}]")
    if sorted_unique and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{name}: {label} must be sorted and unique (as torch.unique returns it)")


def exact_set(name: str, which: str, idx: Optional[Tensor], count: Optional[Tensor], size: int) -> Optional[Tensor]:
    """``idx[:count]`` of a padded set (one synchronization on CUDA), ``idx`` without a count; values checked on
    CPU (inside [0, size), sorted, unique; the count inside [0, len(idx)])."""
    if count is None:
        check_index_values(name, f"{which}_idx", idx, size)
        return idx
    n = int(count)
    if not 0 <= n <= idx.numel():
        raise ValueError(f"{name}: {which}_count={n} must lie in [0, len({which}_idx)={idx.numel()}]")
    check_index_values(name, f"{which}_idx[:{which}_count]", idx[:n], size)
    return idx[:n]


def check_rows_values(name: str, which: str, idx: Tensor, count: Optional[Tensor], size: int) -> None:
    """Per-sample sets: every entry inside [0, size), each count inside [0, k], each row's first ``count`` entries
    strictly increasing; CPU tensors only (on CUDA this would cost a synchronization)."""
    if idx.device.type != "cpu" or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name}: {which}_idx must lie in [0, {size}), got values in [{lo}, {hi}]")
    k = idx.shape[1]
    if count is not None and count.numel() and (int(count.min()) < 0 or int(count.max()) > k):
        raise ValueError(f"{name}: every {which}_count must lie in [0, {k}] (the rows' length), got values in "
                         f"[{int(count.min())}, {int(count.max())}]")
    if k > 1:
        inside = torch.arange(1, k)[None, :] < (k if count is None else count[:, None])
        if bool(((idx[:, 1:] <= idx[:, :-1]) & inside).any()):
            raise ValueError(f"{name}: the first {which}_count entries of each row of {which}_idx must be sorted "
                             "and unique")


def rows_mask(idx: Tensor, count: Optional[Tensor], size: int, dtype: torch.dtype) -> Tensor:
    """(N, size) 0/1 mask of per-sample sets; padding entries (past a row's count) add 0, so a padding entry that
    repeats an active index changes nothing."""
    valid = _rows_valid(idx, count).to(dtype)
    return torch.zeros(idx.shape[0], size, dtype=dtype, device=idx.device).scatter_add_(1, idx, valid)


def compact_rows(x: Tensor, idx: Tensor, count: Optional[Tensor]) -> Tensor:
    """The per-sample compact form (N, k, H, W) of a full-size (N, C, H, W) tensor: channel ``j`` of sample ``n``
    is channel ``idx[n, j]``, zero past the row's count."""
    return _gather_channels(x, idx, _rows_valid(idx, count)).contiguous(memory_format=_fmt(x))


def _as_rows(idx: Optional[Tensor], count: Optional[Tensor], n: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A batch set (1-d ``idx``, 0-d ``count``) as the same set for every sample; per-sample rows unchanged."""
    if idx is None or idx.dim() == 2:
        return idx, count
    rows = idx.unsqueeze(0).expand(n, -1)
    return rows, None if count is None else count.reshape(1).expand(n)


# ---------------------------------------------------------------------- hash_histogram
def hash_histogram_impl(
    x: Tensor,
    planes: Tensor,
    bits: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    in_idx: Optional[Tensor],
    in_count: Optional[Tensor],
    return_codes: bool,
    backend: str,
    per_sample: bool = False,
    compact_input: bool = False,
) -> tuple[Tensor, Tensor]:
    """(hist (L, 2**bits) int64, or (N, L, 2**bits) with ``per_sample``; codes (N, L, H', W') int64, or an empty
    tensor without ``return_codes``)."""
    name = "tritonslide.ops.hash_histogram"
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if compact_input:
        check_rows_values(name, "in", in_idx, in_count, planes.shape[1])
        if _runtime_backend(backend) == "triton":  # the kernel reads full-size inputs
            x, in_idx, in_count = expand_rows(x, in_idx, in_count, planes.shape[1]), None, None
        else:
            with _no_autocast(x.device.type):
                out = torch_hash_histogram_rows(x, in_idx, in_count, planes, bits, stride, padding, dilation,
                                                return_codes, per_sample)
            return (out[0], out[1].contiguous()) if return_codes else (out, x.new_empty(0, dtype=torch.int64))
    if in_idx is not None and in_idx.dim() == 2:
        # per-sample read channels: hashing sample n with its other channels zeroed (the definition)
        check_rows_values(name, "in", in_idx, in_count, x.shape[1])
        x = x * rows_mask(in_idx, in_count, x.shape[1], x.dtype)[:, :, None, None]
        in_idx = None
    else:
        in_idx = exact_set(name, "in", in_idx, in_count, x.shape[1])
    with _no_autocast(x.device.type):
        if _runtime_backend(backend) == "triton":
            out = kernels.get_kernel("hash_histogram")(x, planes, bits, stride, padding, dilation, in_idx,
                                                       return_codes, per_sample=per_sample)
        else:
            out = torch_hash_histogram(x, planes, bits, stride, padding, dilation, in_idx, return_codes,
                                       per_sample)
    if return_codes:
        hist, codes = out
        return hist, codes.contiguous()
    return out, x.new_empty(0, dtype=torch.int64)


hash_histogram = torch.library.custom_op(f"{NS}::hash_histogram", mutates_args=())(hash_histogram_impl)


@hash_histogram.register_fake
def _(x, planes, bits, stride, padding, dilation, in_idx, in_count, return_codes, backend, per_sample=False,
      compact_input=False):
    tables = planes.shape[0] // bits
    hist = x.new_empty(*((x.shape[0],) if per_sample else ()), tables, 1 << bits, dtype=torch.int64)
    if not return_codes:
        return hist, x.new_empty(0, dtype=torch.int64)
    ho, wo = _conv_hw(x.shape[2], x.shape[3], planes.shape[2], planes.shape[3], stride, padding, dilation)
    return hist, x.new_empty(x.shape[0], tables, ho, wo, dtype=torch.int64)


# ---------------------------------------------------------------------- ALSH selection
def alsh_active_set_impl(
    hist: Tensor, filter_codes: Tensor, top_buckets: int, min_active: int
) -> tuple[Tensor, Tensor]:
    """(idx (O,) int64, count 0-d int64): :func:`tritonslide.cpu_fallback.torch_alsh_active_set` on any device
    (a few sorts and gathers of fixed size, queued on the device with no host synchronization)."""
    if filter_codes.device.type == "cpu" and filter_codes.numel():
        lo, hi = int(filter_codes.min()), int(filter_codes.max())
        if lo < 0 or hi >= hist.shape[-1]:
            raise ValueError(f"tritonslide.ops.alsh_active_set: filter_codes must lie in [0, {hist.shape[-1]}), "
                             f"got values in [{lo}, {hi}]")
    return torch_alsh_active_set(hist, filter_codes, top_buckets, min_active)


alsh_active_set = torch.library.custom_op(f"{NS}::alsh_active_set", mutates_args=())(alsh_active_set_impl)


@alsh_active_set.register_fake
def _(hist, filter_codes, top_buckets, min_active):
    lead = tuple(hist.shape[:-2])  # (N,) for per-sample histograms
    return filter_codes.new_empty(*lead, filter_codes.shape[0]), filter_codes.new_empty(lead)


def active_indices_impl(idx: Tensor, count: Tensor) -> Tensor:
    """``idx[:count]``: the exact active set; its length is the data (one synchronization on CUDA)."""
    return idx[: int(count)].clone()


active_indices = torch.library.custom_op(f"{NS}::active_indices", mutates_args=())(active_indices_impl)


@active_indices.register_fake
def _(idx, count):
    size = idx.shape[0]
    # the bound must be a plain int; a symbolic len(idx) (dynamic shapes) is added as a checked fact instead
    n = torch.library.get_ctx().new_dynamic_size(min=0, max=size if isinstance(size, int) else None)
    if not isinstance(size, int):
        torch._check(n <= size)
    return idx.new_empty(n)


# ---------------------------------------------------------------------- active_conv2d
def _active_backend(backend: str, x: Tensor, weight: Tensor, out_idx, out_count, stride, padding, dilation,
                    backward: bool) -> str:
    """``"auto"`` (the op layer's Triton choice under the auto backend): this GPU's measured table may send the
    shape to the torch path (tritonslide/_dispatch.py); decided here, at run time, per call, and the same way for
    a forward and its backward (the key says whether a backward follows)."""
    if backend != "auto" or not kernels.has_triton():
        return _runtime_backend(backend)
    if out_count is None and _dispatch.has_measurements("active_conv2d", x.device):
        key = _dispatch.conv_key(x, weight, stride, padding, dilation, backward)
        fraction = 1.0 if out_idx is None else out_idx.numel() / weight.shape[0]
        return _dispatch.measured_backend("active_conv2d", x.device, key, fraction) or "triton"
    return "triton"


def active_conv2d_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out_idx: Optional[Tensor],
    in_idx: Optional[Tensor],
    out_count: Optional[Tensor],
    in_count: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    compact_input: bool,
    compact_output: bool,
    backend: str,
    will_backward: bool,
) -> Tensor:
    name = "tritonslide.ops.active_conv2d"
    if out_count is None:
        check_index_values(name, "out_idx", out_idx, weight.shape[0])
    elif out_count.device.type == "cpu":
        exact_set(name, "out", out_idx, out_count, weight.shape[0])
    in_idx = exact_set(name, "in", in_idx, in_count, weight.shape[1])
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    backend = _active_backend(backend, x, weight, out_idx, out_count, stride, padding, dilation, will_backward)
    with _no_autocast(x.device.type):
        if backend == "triton":
            y = kernels.get_kernel("active_conv2d")(x, weight, bias, out_idx, in_idx, stride, padding, dilation,
                                                    compact_input, compact_output, out_count=out_count)
        else:
            if out_count is not None:  # the fallback takes the exact set (on CUDA this reads the count: one sync)
                out_idx = out_idx[: int(out_count)]
            y = torch_active_conv2d(x, weight, bias, out_idx, in_idx, stride, padding, dilation, compact_input,
                                    compact_output)
    return _like(y, _fmt(x))


active_conv2d = torch.library.custom_op(f"{NS}::active_conv2d", mutates_args=())(active_conv2d_impl)


@active_conv2d.register_fake
def _(x, weight, bias, out_idx, in_idx, out_count, in_count, stride, padding, dilation, compact_input,
      compact_output, backend, will_backward):
    o = out_idx.shape[0] if compact_output and out_idx is not None else weight.shape[0]
    ho, wo = _conv_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    return torch.empty((x.shape[0], o, ho, wo), dtype=x.dtype, device=x.device, memory_format=_fmt(x))


def active_conv2d_backward_impl(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    out_idx: Optional[Tensor],
    in_idx: Optional[Tensor],
    out_count: Optional[Tensor],
    in_count: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    has_bias: bool,
    needs: Sequence[bool],
    compact_input: bool,
    compact_output: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db) of :func:`active_conv2d`; an empty tensor for each gradient ``needs`` does not ask for."""
    if in_count is not None:
        in_idx = in_idx[: int(in_count)]
    stride, padding, dilation, needs = tuple(stride), tuple(padding), tuple(dilation), tuple(bool(n) for n in needs)
    backend = _active_backend(backend, x, weight, out_idx, out_count, stride, padding, dilation, True)
    with _no_autocast(x.device.type):
        if backend == "triton":
            bwd = kernels.get_kernel("active_conv2d_backward")
            dx, dw, db = bwd(grad_y, x, weight, has_bias, out_idx, in_idx, stride, padding, dilation, needs,
                             compact_input, compact_output, out_count=out_count)
        else:
            if out_count is not None:
                out_idx = out_idx[: int(out_count)]
            dx, dw, db = torch_active_conv2d_backward(grad_y, x, weight, has_bias, out_idx, in_idx, stride, padding,
                                                      dilation, needs, compact_input, compact_output)
    return _grads((dx, x, _fmt(x)), (dw, weight, _C), (db, weight, _C))


active_conv2d_backward = torch.library.custom_op(f"{NS}::active_conv2d_backward", mutates_args=())(
    active_conv2d_backward_impl
)


@active_conv2d_backward.register_fake
def _(grad_y, x, weight, out_idx, in_idx, out_count, in_count, stride, padding, dilation, has_bias, needs,
      compact_input, compact_output, backend):
    bias_like = weight.new_empty(weight.shape[0])
    return _fake_grads((needs[0], needs[1], needs[2] and has_bias), (x, _fmt(x)), (weight, _C), (bias_like, _C))


def _active_setup(ctx, inputs, output):
    (x, weight, bias, out_idx, in_idx, out_count, in_count, stride, padding, dilation, compact_input,
     compact_output, backend, _) = inputs
    ctx.save_for_backward(x, weight, out_idx, in_idx, out_count, in_count)
    ctx.conf = (bias is not None, tuple(stride), tuple(padding), tuple(dilation), compact_input, compact_output,
                backend)


def _active_backward(ctx, grad_y):
    x, weight, out_idx, in_idx, out_count, in_count = ctx.saved_tensors
    has_bias, stride, padding, dilation, compact_input, compact_output, backend = ctx.conf
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and has_bias
    dx, dw, db = _call(active_conv2d_backward, active_conv2d_backward_impl,
        grad_y, x, weight, out_idx, in_idx, out_count, in_count, stride, padding, dilation, has_bias, needs,
        compact_input, compact_output, backend,
    )
    return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
            None, None, None, None, None, None, None, None, None, None, None)


active_conv2d.register_autograd(_active_backward, setup_context=_active_setup)


# ---------------------------------------------------------------------- active_conv2d with per-sample sets
def _sample_args(name, x, weight, out_idx, out_count, in_idx, in_count):
    n = x.shape[0]
    out_idx, out_count = _as_rows(out_idx, out_count, n)
    in_idx, in_count = _as_rows(in_idx, in_count, n)
    if out_idx is None:  # every filter for every sample
        out_idx = torch.arange(weight.shape[0], device=x.device).expand(n, -1)
    check_rows_values(name, "out", out_idx, out_count, weight.shape[0])
    if in_idx is not None:
        check_rows_values(name, "in", in_idx, in_count, weight.shape[1])
    return out_idx, out_count, in_idx, in_count


def _full_rows(idx: Tensor, count: Optional[Tensor], size: int) -> tuple[Tensor, Tensor]:
    """The Triton launchers' form of per-sample rows: (N, size) int64 (shorter rows padded with index 0, past the
    count) and an (N,) count on the device."""
    if count is None:
        count = torch.full((idx.shape[0],), idx.shape[1], dtype=torch.int64, device=idx.device)
    if idx.shape[1] < size:
        idx = torch.nn.functional.pad(idx, (0, size - idx.shape[1]))
    return idx.contiguous(), count


def sample_conv2d_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out_idx: Optional[Tensor],
    out_count: Optional[Tensor],
    in_idx: Optional[Tensor],
    in_count: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    compact_input: bool,
    compact_output: bool,
    backend: str,
    will_backward: bool,
) -> Tensor:
    """``active_conv2d`` with per-sample sets (issue #15): ``torch_sample_conv2d`` or the Triton launcher, which
    computes each sample's active rows on all channels of ``x`` masked to the sample's read channels (the compact
    forms are expanded to full size and back around it; the kernels have no compact form yet). ``will_backward``
    (a training forward) lets the CPU fallback run its groups on worker threads; an inference forward runs them on
    the calling thread (``torch_sample_conv2d``'s ``workers``)."""
    name = "tritonslide.ops.active_conv2d"
    out_idx, out_count, in_idx, in_count = _sample_args(name, x, weight, out_idx, out_count, in_idx, in_count)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    with _no_autocast(x.device.type):
        if _runtime_backend(backend) == "triton":
            if compact_input:
                x = expand_rows(x, in_idx, in_count, weight.shape[1])
            elif in_idx is not None:
                x = x * rows_mask(in_idx, in_count, x.shape[1], x.dtype)[:, :, None, None]
            rows, count = _full_rows(out_idx, out_count, weight.shape[0])
            y = kernels.get_kernel("sample_conv2d")(x, weight, bias, rows, count, stride, padding, dilation)
            if compact_output:
                y = compact_rows(y, out_idx, out_count)
        else:
            y = torch_sample_conv2d(x, weight, bias, out_idx, out_count, in_idx, in_count, stride, padding, dilation,
                                    compact_input, compact_output, workers=will_backward)
    return _like(y, _fmt(x))


sample_conv2d = torch.library.custom_op(f"{NS}::sample_conv2d", mutates_args=())(sample_conv2d_impl)


@sample_conv2d.register_fake
def _(x, weight, bias, out_idx, out_count, in_idx, in_count, stride, padding, dilation, compact_input,
      compact_output, backend, will_backward):
    ho, wo = _conv_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    o = out_idx.shape[-1] if compact_output and out_idx is not None else weight.shape[0]
    return torch.empty((x.shape[0], o, ho, wo), dtype=x.dtype, device=x.device, memory_format=_fmt(x))


def sample_conv2d_backward_impl(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    out_idx: Optional[Tensor],
    out_count: Optional[Tensor],
    in_idx: Optional[Tensor],
    in_count: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    compact_input: bool,
    compact_output: bool,
    has_bias: bool,
    needs: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db) of :func:`sample_conv2d_impl`; an empty tensor for each gradient ``needs`` does not ask for."""
    name = "tritonslide.ops.active_conv2d"
    out_idx, out_count, in_idx, in_count = _sample_args(name, x, weight, out_idx, out_count, in_idx, in_count)
    stride, padding, dilation, needs = tuple(stride), tuple(padding), tuple(dilation), tuple(bool(n) for n in needs)
    if grad_y.dtype != x.dtype:
        grad_y = grad_y.to(x.dtype)
    with _no_autocast(x.device.type):
        if _runtime_backend(backend) == "triton":
            if compact_input:
                xm, m_in = expand_rows(x, in_idx, in_count, weight.shape[1]), None
            else:
                m_in = None if in_idx is None else rows_mask(in_idx, in_count, x.shape[1], x.dtype)[:, :, None, None]
                xm = x if m_in is None else x * m_in
            g = expand_rows(grad_y, out_idx, out_count, weight.shape[0]) if compact_output else grad_y
            rows, count = _full_rows(out_idx, out_count, weight.shape[0])
            # samples meet in dW through fp32 atomics, in no fixed order; under torch.use_deterministic_algorithms
            # dW is instead one per-batch dW over every filter of dy masked per sample (no split-K there): the dense
            # layer's dW work, summed in a fixed order
            deterministic = needs[1] and torch.are_deterministic_algorithms_enabled()
            dx, dw, db = kernels.get_kernel("sample_conv2d_backward")(
                g, xm, weight, has_bias, rows, count, stride, padding, dilation,
                (needs[0], needs[1] and not deterministic, needs[2]))
            if deterministic:
                m_out = rows_mask(out_idx, out_count, weight.shape[0], torch.float32)[:, :, None, None] > 0
                _, dw, _ = kernels.get_kernel("active_conv2d_backward")(
                    torch.where(m_out, g, 0), xm, weight, False, None, None, stride, padding, dilation,
                    (False, True, False))
            if dx is not None and compact_input:
                dx = compact_rows(dx, in_idx, in_count)
            elif dx is not None and m_in is not None:
                dx = dx * m_in
        else:
            dx, dw, db = torch_sample_conv2d_backward(grad_y, x, weight, has_bias, out_idx, out_count, in_idx,
                                                      in_count, stride, padding, dilation, needs, compact_input,
                                                      compact_output)
    return _grads((dx, x, _fmt(x)), (dw, weight, _C), (db, weight, _C))


sample_conv2d_backward = torch.library.custom_op(f"{NS}::sample_conv2d_backward", mutates_args=())(
    sample_conv2d_backward_impl
)


@sample_conv2d_backward.register_fake
def _(grad_y, x, weight, out_idx, out_count, in_idx, in_count, stride, padding, dilation, compact_input,
      compact_output, has_bias, needs, backend):
    bias_like = weight.new_empty(weight.shape[0])
    return _fake_grads((needs[0], needs[1], needs[2] and has_bias), (x, _fmt(x)), (weight, _C), (bias_like, _C))


def _sample_setup(ctx, inputs, output):
    x, weight, bias, out_idx, out_count, in_idx, in_count, stride, padding, dilation, c_in, c_out, backend, _ = inputs
    ctx.save_for_backward(x, weight, out_idx, out_count, in_idx, in_count)
    ctx.conf = (bias is not None, tuple(stride), tuple(padding), tuple(dilation), c_in, c_out, backend)


def _sample_backward(ctx, grad_y):
    x, weight, out_idx, out_count, in_idx, in_count = ctx.saved_tensors
    has_bias, stride, padding, dilation, c_in, c_out, backend = ctx.conf
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and has_bias
    dx, dw, db = _call(sample_conv2d_backward, sample_conv2d_backward_impl,
        grad_y, x, weight, out_idx, out_count, in_idx, in_count, stride, padding, dilation, c_in, c_out, has_bias,
        needs, backend,
    )
    return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None,
            None, None, None, None, None, None, None, None, None, None, None)


sample_conv2d.register_autograd(_sample_backward, setup_context=_sample_setup)


# ---------------------------------------------------------------------- sketch_conv2d
def sketch_conv2d_impl(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor],
    out_idx: Optional[Tensor],
    out_count: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(y, z): ``z = conv2d(x, A)`` is kept for the backward pass."""
    out_idx = exact_set("tritonslide.ops.sketch_conv2d", "out", out_idx, out_count, b.shape[0])
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    with _no_autocast(x.device.type):
        fwd = kernels.get_kernel("sketch_conv2d") if _runtime_backend(backend) == "triton" else torch_sketch_conv2d
        y, z = fwd(x, a, b, bias, out_idx, stride, padding, dilation)
    fmt = _fmt(x)
    return _like(y, fmt), _like(z, fmt)


sketch_conv2d = torch.library.custom_op(f"{NS}::sketch_conv2d", mutates_args=())(sketch_conv2d_impl)


@sketch_conv2d.register_fake
def _(x, a, b, bias, out_idx, out_count, stride, padding, dilation, backend):
    ho, wo = _conv_hw(x.shape[2], x.shape[3], a.shape[2], a.shape[3], stride, padding, dilation)
    fmt = _fmt(x)
    y = torch.empty((x.shape[0], b.shape[0], ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    z = torch.empty((x.shape[0], a.shape[0], ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    return y, z


def sketch_conv2d_backward_impl(
    grad_y: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    z: Tensor,
    has_bias: bool,
    out_idx: Optional[Tensor],
    out_count: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    needs: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias); an empty tensor for each gradient ``needs`` does not ask for."""
    if out_count is not None:
        out_idx = out_idx[: int(out_count)]
    stride, padding, dilation, needs = tuple(stride), tuple(padding), tuple(dilation), tuple(bool(n) for n in needs)
    with _no_autocast(x.device.type):
        triton = _runtime_backend(backend) == "triton"
        bwd = kernels.get_kernel("sketch_conv2d_backward") if triton else torch_sketch_conv2d_backward
        dx, da, db, dbias = bwd(grad_y, x, a, b, z, has_bias, out_idx, stride, padding, dilation, needs)
    return _grads((dx, x, _fmt(x)), (da, a, _C), (db, b, _C), (dbias, b, _C))


sketch_conv2d_backward = torch.library.custom_op(f"{NS}::sketch_conv2d_backward", mutates_args=())(
    sketch_conv2d_backward_impl
)


@sketch_conv2d_backward.register_fake
def _(grad_y, x, a, b, z, has_bias, out_idx, out_count, stride, padding, dilation, needs, backend):
    needs = (needs[0], needs[1], needs[2], needs[3] and has_bias)
    return _fake_grads(needs, (x, _fmt(x)), (a, _C), (b, _C), (b.new_empty(b.shape[0]), _C))


def _sketch_conv_setup(ctx, inputs, output):
    x, a, b, bias, out_idx, out_count, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(x, a, b, output[1], out_idx, out_count)
    ctx.conf = (bias is not None, tuple(stride), tuple(padding), tuple(dilation), backend)


def _sketch_conv_backward(ctx, grad_y, grad_z):
    x, a, b, z, out_idx, out_count = ctx.saved_tensors
    has_bias, stride, padding, dilation, backend = ctx.conf
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    needs[3] = needs[3] and has_bias
    grads = _call(sketch_conv2d_backward, sketch_conv2d_backward_impl,
        grad_y, x, a, b, z, has_bias, out_idx, out_count, stride, padding, dilation, needs, backend
    )
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None, None)


sketch_conv2d.register_autograd(_sketch_conv_backward, setup_context=_sketch_conv_setup)


# ---------------------------------------------------------------------- sketch_linear
def sketch_linear_impl(
    x: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], out_idx: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    """(y, z): ``z = x A^T`` is kept for the backward pass."""
    check_index_values("tritonslide.ops.sketch_linear", "out_idx", out_idx, b.shape[0])
    with _no_autocast(x.device.type):
        fwd = kernels.get_kernel("sketch_linear") if _runtime_backend(backend) == "triton" else torch_sketch_linear
        y, z = fwd(x, a, b, bias, out_idx)
    return y.contiguous(), z.contiguous()


sketch_linear = torch.library.custom_op(f"{NS}::sketch_linear", mutates_args=())(sketch_linear_impl)


@sketch_linear.register_fake
def _(x, a, b, bias, out_idx, backend):
    return x.new_empty(*x.shape[:-1], b.shape[0]), x.new_empty(*x.shape[:-1], a.shape[0])


def sketch_linear_backward_impl(
    grad_y: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    z: Tensor,
    has_bias: bool,
    out_idx: Optional[Tensor],
    needs: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs)
    with _no_autocast(x.device.type):
        triton = _runtime_backend(backend) == "triton"
        bwd = kernels.get_kernel("sketch_linear_backward") if triton else torch_sketch_linear_backward
        dx, da, db, dbias = bwd(grad_y, x, a, b, z, has_bias, out_idx, needs)
    return _grads((dx, x, _C), (da, a, _C), (db, b, _C), (dbias, b, _C))


sketch_linear_backward = torch.library.custom_op(f"{NS}::sketch_linear_backward", mutates_args=())(
    sketch_linear_backward_impl
)


@sketch_linear_backward.register_fake
def _(grad_y, x, a, b, z, has_bias, out_idx, needs, backend):
    needs = (needs[0], needs[1], needs[2], needs[3] and has_bias)
    return _fake_grads(needs, (x, _C), (a, _C), (b, _C), (b.new_empty(b.shape[0]), _C))


def _sketch_linear_setup(ctx, inputs, output):
    x, a, b, bias, out_idx, backend = inputs
    ctx.save_for_backward(x, a, b, output[1], out_idx)
    ctx.conf = (bias is not None, backend)


def _sketch_linear_backward(ctx, grad_y, grad_z):
    x, a, b, z, out_idx = ctx.saved_tensors
    has_bias, backend = ctx.conf
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    needs[3] = needs[3] and has_bias
    grads = _call(sketch_linear_backward, sketch_linear_backward_impl, grad_y, x, a, b, z, has_bias, out_idx, needs,
                  backend)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


sketch_linear.register_autograd(_sketch_linear_backward, setup_context=_sketch_linear_setup)


# ---------------------------------------------------------------------- eager autograd twins
def _eager_function(name: str, impl, setup, backward) -> type[torch.autograd.Function]:
    """The autograd Function of the eager path: the op's implementation forward, the same ``setup_context`` and
    backward formula as the registered op (whose backward runs the backward op's implementation directly)."""

    # ctx-style forward: a Function with a separate setup_context binds its arguments with inspect.signature on
    # every call (110 us here)
    def forward(ctx, *args):
        out = impl(*args)
        setup(ctx, args, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(bwd),
    })


ActiveConv2dFunction = _eager_function("ActiveConv2dFunction", active_conv2d_impl, _active_setup, _active_backward)
SampleConv2dFunction = _eager_function("SampleConv2dFunction", sample_conv2d_impl, _sample_setup, _sample_backward)
SketchConv2dFunction = _eager_function("SketchConv2dFunction", sketch_conv2d_impl, _sketch_conv_setup,
                                       _sketch_conv_backward)
SketchLinearFunction = _eager_function("SketchLinearFunction", sketch_linear_impl, _sketch_linear_setup,
                                       _sketch_linear_backward)
