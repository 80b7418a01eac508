"""The op layer: ``tritonslide.ops.<op>``, one backend choice per call, one registered custom op per op.

Every op checks its arguments here (shapes, dtypes, devices: nothing that reads tensor data, so the checks trace),
casts its operands under autocast as ``F.conv2d`` would, asks :func:`tritonslide._backend.resolve_backend` for
``"torch"`` or ``"triton"`` and calls ``torch.ops.tritonslide.<op>`` (:mod:`tritonslide._library`), whose
implementation runs ``tritonslide.cpu_fallback.torch_<op>`` or the Triton launcher of ``tritonslide.kernels`` and
checks index values at run time. In eager mode on plain tensors the implementation is called directly (with the
op's autograd formula as an ``autograd.Function``), skipping the dispatch of the registered op, which costs more
than a small layer's kernels (:func:`tritonslide._library.eager`); traced code always sees the registered op.
Nothing below this layer sees a module, a config or a hash-table object: only tensors.

Autocast: inside ``torch.autocast(device, dtype)`` the convolution-like ops (``active_conv2d``, ``sketch_conv2d``,
``sketch_linear``) cast float32 / float16 / bfloat16 operands to the autocast dtype and return it, as ``F.conv2d``
and ``F.linear`` do; gradients flow back to the Parameters in their own dtype. ``hash_histogram`` hashes ``x`` in
its own dtype (projections accumulate in float32).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.modules.utils import _pair

from tritonslide import _library  # registers torch.ops.tritonslide.*
from tritonslide._backend import current_backend, resolve_backend

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
    """Index tensors must be 1-d int64 on x's device; their values (inside [0, size), sorted, unique) are checked
    by the op's implementation on CPU tensors (on CUDA that check would cost a synchronization per call)."""
    if idx is None:
        return
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{name}: expected {label} to be a 1-d int64 tensor, got {got}")
    if idx.device != device:
        raise ValueError(f"{name}: {label} is on {idx.device} but x is on {device}")
    if sorted_unique and idx.shape[0] > size:
        raise ValueError(f"{name}: {label} has {idx.numel()} entries but there are only {size} channels")


def _check_count(
    name: str, idx, count, compact: bool, size: int, device: torch.device, which: str = "out"
) -> None:
    """``<which>_count`` with a padded ``<which>_idx``: its first ``count`` entries are the sorted unique set."""
    if count is None:
        _check_index(name, f"{which}_idx", idx, size, device)
        return
    what = "output" if which == "out" else "input"
    if compact:
        raise ValueError(f"{name}: {which}_count needs compact_{what}=False (the {what} shape would be the count)")
    if idx is None:
        raise ValueError(f"{name}: {which}_count needs {which}_idx (its first {which}_count entries are the set)")
    if not isinstance(count, torch.Tensor) or count.numel() != 1 or count.dtype != torch.int64:
        got = f"{count.dtype} tensor of shape {tuple(count.shape)}" if isinstance(count, torch.Tensor) \
            else type(count).__name__
        raise TypeError(f"{name}: expected {which}_count to be a 0-d int64 tensor, got {got}")
    if count.device != device:
        raise ValueError(f"{name}: {which}_count is on {count.device} but x is on {device}")
    _check_index(name, f"{which}_idx", idx, size, device, sorted_unique=False)


def _check_rows(name: str, which: str, idx, count, n: int, size: int, device: torch.device) -> None:
    """Per-sample sets (issue #15): ``<which>_idx`` (N, k) int64 whose row ``n`` starts with sample ``n``'s sorted
    set; ``<which>_count`` (N,) int64 (entries past it are padding), or None (the whole row is the set)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
        got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{name}: expected per-sample {which}_idx to be an (N, k) int64 tensor, got {got}")
    if idx.shape[0] != n or idx.shape[1] > size:
        raise ValueError(f"{name}: per-sample {which}_idx must have shape (N={n}, k <= {size}), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name}: {which}_idx is on {idx.device} but x is on {device}")
    if count is None:
        return
    if not isinstance(count, torch.Tensor) or count.shape != (n,) or count.dtype != torch.int64:
        got = f"{count.dtype} tensor of shape {tuple(count.shape)}" if isinstance(count, torch.Tensor) \
            else type(count).__name__
        raise TypeError(f"{name}: with a per-sample {which}_idx, {which}_count must be an (N={n},) int64 tensor, "
                        f"got {got}")
    if count.device != device:
        raise ValueError(f"{name}: {which}_count is on {count.device} but x is on {device}")


def _per_sample(idx) -> bool:
    return isinstance(idx, torch.Tensor) and idx.dim() == 2


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``(x, *tensors)`` cast to the autocast dtype of x's device when autocast is on there (float64 and integer
    tensors are left alone, as autocast leaves them); unchanged otherwise."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t
                 for t in (x, *tensors))


def _backend_arg(op: str, x: torch.Tensor) -> str:
    """The backend argument of the custom op: ``"torch"``, ``"triton"`` (forced), or ``"auto"`` where the auto
    choice picked Triton, whose implementation then checks at run time that Triton imports and, for active_conv2d,
    whether this GPU's measured table sends the shape to the torch path (tritonslide/_dispatch.py)."""
    backend = resolve_backend(op, x)
    return "auto" if backend == "triton" and current_backend() == "auto" else backend


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def hash_histogram(
    x: torch.Tensor,
    planes: torch.Tensor,
    bits: int,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    in_idx: torch.Tensor | None = None,
    return_codes: bool = False,
    in_count: torch.Tensor | None = None,
    per_sample: bool = False,
    compact_input: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hyperplane-hash every im2col patch of ``x`` and count the codes per table.

    ``planes``: (L*bits, C, kh, kw). For every patch ``p`` of the batch (the columns of im2col with this
    stride / padding / dilation) bit ``j`` of table ``t`` is ``[<planes[t*bits+j], p> >= 0]`` and the table's
    code is ``sum_j bit_j << j`` (Feeney 2019, eq. 3.3-3.4). Returns the (L, 2**bits) int64 histogram of codes
    over all patches of the batch, and the (N, L, H', W') int64 codes when ``return_codes``. With ``in_idx`` the
    projection reads only those input channels, which equals hashing ``x`` with the other channels zeroed; with
    ``in_count`` (0-d int64) only the first ``in_count`` entries of ``in_idx`` are the set (the padded form of
    :func:`alsh_active_set`). Not differentiable (its outputs are integers).

    Per sample (issue #15): ``per_sample=True`` returns one histogram per sample over its own patches,
    (N, L, 2**bits), which makes each sample's active set independent of its batch companions. ``in_idx`` may then
    be (N, k) with ``in_count`` (N,): each sample's own read channels (the per-sample sets of
    :func:`alsh_active_set`), which equals hashing each sample with its other channels zeroed. With
    ``compact_input`` (per-sample ``in_idx`` only) ``x`` is (N, k, H, W) and holds just those channels, as a linked
    per-sample layer hands them over: channel ``j`` of sample ``n`` is input channel ``in_idx[n, j]`` (channels past
    its ``in_count`` are never read), and ``planes`` keep the full C; the CPU fallback then never builds the
    full-size input for a stride-1 layer of at most 3x3 taps.
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
    if not isinstance(per_sample, bool) or not isinstance(compact_input, bool):
        raise TypeError(f"{name}: per_sample and compact_input must be bools, got {per_sample!r} and "
                        f"{compact_input!r}")
    if compact_input and not _per_sample(in_idx):
        raise ValueError(f"{name}: compact_input=True needs per-sample in_idx rows (N, k): the channels x holds")
    if compact_input and in_idx.shape[-1] != x.shape[1]:
        raise ValueError(f"{name}: with compact_input x must have in_idx.shape[1]={in_idx.shape[-1]} channels, got "
                         f"{x.shape[1]}")
    if not compact_input and planes.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: planes have {planes.shape[1]} input channels but x has {x.shape[1]}")
    if planes.device != x.device:
        raise ValueError(f"{name}: planes are on {planes.device} but x is on {x.device}")
    if _per_sample(in_idx):
        _check_rows(name, "in", in_idx, in_count, x.shape[0], planes.shape[1], x.device)
    else:
        _check_count(name, in_idx, in_count, False, x.shape[1], x.device, "in")
    backend = _backend_arg("hash_histogram", x)
    args = (x.detach(), planes.detach(), bits, stride, padding, dilation, in_idx, in_count, return_codes, backend,
            per_sample, compact_input)
    op = _library.hash_histogram_impl if _library.eager(x, planes, in_idx, in_count) else _library.hash_histogram
    hist, codes = op(*args)
    return (hist, codes) if return_codes else hist


def alsh_active_set(
    hist: torch.Tensor, filter_codes: torch.Tensor, top_buckets: int, min_active: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ALSH active set of one step, chosen on ``hist``'s device with no host synchronization.

    ``hist``: (L, 2**K) int64 query histogram (:func:`hash_histogram`); ``filter_codes``: (O, L) int64 codes of
    the filters. Per table the ``top_buckets`` most frequent codes are taken (ties to the lower code; a code no
    query hit is never taken unless ``top_buckets`` covers every code); a filter is active when its code in any
    table is among them (Feeney 2019, sec. 4.2 and Alg. 4); at least ``min_active`` filters are kept (the most
    voted ones). Returns ``(idx, count)``: an (O,) int64 buffer whose first ``count``
    entries are the active filters in ascending order (the rest: the inactive ones) and a 0-d int64 ``count``,
    both on the device, so that a kernel can consume the set without the host reading its size.
    ``idx[:count]`` (one synchronization on CUDA) is the sorted index tensor the other ops take.

    Per sample (issue #15): a (N, L, 2**K) ``hist`` (``hash_histogram(..., per_sample=True)``) gives each sample its
    own set: ``idx`` (N, O) rows and ``count`` (N,), which :func:`active_conv2d` takes as they are.
    """
    name = "tritonslide.ops.alsh_active_set"
    if not isinstance(hist, torch.Tensor) or hist.dim() not in (2, 3) or hist.dtype != torch.int64:
        got = f"{hist.dtype} tensor of shape {tuple(hist.shape)}" if isinstance(hist, torch.Tensor) else type(hist)
        raise TypeError(f"{name}: expected hist to be an (L, 2**K) or (N, L, 2**K) int64 tensor, got {got}")
    if not isinstance(filter_codes, torch.Tensor) or filter_codes.dim() != 2 or filter_codes.dtype != torch.int64:
        got = (f"{filter_codes.dtype} tensor of shape {tuple(filter_codes.shape)}"
               if isinstance(filter_codes, torch.Tensor) else type(filter_codes))
        raise TypeError(f"{name}: expected filter_codes to be an (O, L) int64 tensor, got {got}")
    if filter_codes.shape[1] != hist.shape[-2]:
        raise ValueError(f"{name}: filter_codes has {filter_codes.shape[1]} tables but hist has {hist.shape[-2]}")
    if filter_codes.device != hist.device:
        raise ValueError(f"{name}: filter_codes are on {filter_codes.device} but hist is on {hist.device}")
    n_buckets = hist.shape[-1]
    if n_buckets == 0 or n_buckets & (n_buckets - 1):
        raise ValueError(f"{name}: hist must have 2**K columns, got {n_buckets}")
    for label, value, low in (("top_buckets", top_buckets, 1), ("min_active", min_active, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: {label} must be an int >= {low}, got {value!r}")
    op = _library.alsh_active_set_impl if _library.eager(hist, filter_codes) else _library.alsh_active_set
    return op(hist, filter_codes, top_buckets, min_active)


def active_indices(idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``idx[:count]``, the exact active set of :func:`alsh_active_set`'s ``(idx, count)``: its length is data (one
    synchronization on CUDA). Under ``torch.compile`` / ``torch.export`` the length is an unbacked symbolic size
    bounded by ``len(idx)``, so code that uses the exact set traces without a graph break."""
    return (_library.active_indices_impl if _library.eager(idx, count) else _library.active_indices)(idx, count)


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
    in_count: torch.Tensor | None = None,
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
    which reads the count). Not with ``compact_output``, whose shape would depend on the count. ``in_count`` is the
    same for ``in_idx`` (not with ``compact_input``); the implementation slices the set (one sync on CUDA).

    Per-sample sets (issue #15): ``out_idx`` of shape (N, k) with ``out_count`` (N,) (or None: whole rows) gives
    sample ``n`` the filters ``out_idx[n, :out_count[n]]`` (sorted unique; the rest of the row is padding), and
    ``in_idx`` (N, k) with ``in_count`` (N,) its own read channels; a 1-d set next to a 2-d one applies to every
    sample. Then ``y[n] = conv2d(x[n] * m_in[n], W, b) * m_out[n]``: a sample's output does not depend on its batch
    companions. Backward: dW and db sum each sample's contribution into its own active rows only; dx reaches each
    sample's read channels only. No host synchronization on CUDA. Per-sample compact forms are as wide as the rows:
    ``compact_input`` means x is (N, in_idx.shape[-1], H, W) and its channel ``j`` of sample ``n`` is input channel
    ``in_idx[n, j]`` for ``j < in_count[n]`` (the channels past the count are not read); ``compact_output`` returns
    (N, out_idx.shape[-1], H', W') with channel ``j`` of sample ``n`` the filter ``out_idx[n, j]``, zero past the
    count. Gradients come back in the same forms.
    """
    name = "tritonslide.ops.active_conv2d"
    _check_x(name, x)
    stride, padding, dilation = _conv_args(name, stride, padding, dilation)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{name}: expected weight of shape (O, C, kh, kw), got {getattr(weight, 'shape', weight)}")
    x, weight, bias = _autocast(x, weight, bias)
    if compact_input and in_idx is None:
        raise ValueError(f"{name}: compact_input=True needs in_idx (the channels x holds)")
    expected_c = in_idx.shape[-1] if compact_input else weight.shape[1]
    if x.shape[1] != expected_c:
        what = f"{expected_c} input channels"
        if compact_input:
            what = f"len(in_idx)={expected_c}" if in_idx.dim() == 1 else f"in_idx.shape[1]={expected_c} (the rows)"
        raise ValueError(f"{name}: weight expects {what} but x has {x.shape[1]}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"{name}: weight is {weight.dtype} on {weight.device} but x is {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"{name}: expected bias of shape ({weight.shape[0]},) and dtype {x.dtype}, got {bias.shape}")
    per_sample = _per_sample(out_idx) or _per_sample(in_idx)
    for which, idx, count, size in (("out", out_idx, out_count, weight.shape[0]), ("in", in_idx, in_count,
                                                                                   weight.shape[1])):
        if _per_sample(idx):
            _check_rows(name, which, idx, count, x.shape[0], size, x.device)
        else:
            # a per-sample compact tensor is as wide as the rows, whatever the counts: a count is allowed there
            compact = (compact_output if which == "out" else compact_input) and not per_sample
            _check_count(name, idx, count, compact, size, x.device, which)
    for label, size, extent in (("height", x.shape[2], weight.shape[2]), ("width", x.shape[3], weight.shape[3])):
        i = 0 if label == "height" else 1
        if size + 2 * padding[i] < dilation[i] * (extent - 1) + 1:
            raise ValueError(f"{name}: input {label} {size} (padded {size + 2 * padding[i]}) is smaller than the "
                             f"dilated kernel extent {dilation[i] * (extent - 1) + 1}")
    if per_sample:
        args = (x, weight, bias, out_idx, out_count, in_idx, in_count, stride, padding, dilation,
                bool(compact_input), bool(compact_output), _backend_arg("sample_conv2d", x),
                _needs_grad(x, weight, bias))
        if _library.eager(x, weight, bias, out_idx, in_idx, out_count, in_count):
            return _library.SampleConv2dFunction.apply(*args)
        return _library.sample_conv2d(*args)
    backend = _backend_arg("active_conv2d", x)
    args = (x, weight, bias, out_idx, in_idx, out_count, in_count, stride, padding, dilation, bool(compact_input),
            bool(compact_output), backend, _needs_grad(x, weight, bias))
    if _library.eager(x, weight, bias, out_idx, in_idx, out_count, in_count):
        return _library.ActiveConv2dFunction.apply(*args)
    return _library.active_conv2d(*args)


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


def sketch_conv2d(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    out_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sketch-then-unsketch convolution: ``y = conv2d(conv2d(x, A), B[:, :, None, None]) + bias``.

    ``A``: (r, C, kh, kw), ``B``: (O, r). Equals ``conv2d(x, (B @ A.flatten(1)).view(O, C, kh, kw), bias)`` without
    forming that weight (Kasiviswanathan et al., eq. 2: every SK-CONV term is one such chain, the terms
    concatenated along r). Only the rows ``out_idx`` of ``B`` are computed; other output channels are zero and
    get zero gradients in ``B`` and ``bias`` (as in :func:`active_conv2d`); with ``out_count`` only the first
    ``out_count`` entries of ``out_idx`` are the rows (the padded set of :func:`alsh_active_set`, sliced by the
    implementation). Differentiable in x, A, B and bias. Per-sample rows: ``out_idx`` (N, k) with ``out_count``
    (N,) keeps sample ``n``'s rows ``out_idx[n, :out_count[n]]`` (issue #15; see :func:`active_conv2d`).
    """
    name = "tritonslide.ops.sketch_conv2d"
    _check_x(name, x)
    x, a, b, bias = _autocast(x, a, b, bias)
    stride, padding, dilation = _conv_args(name, stride, padding, dilation)
    _check_factor(name, "A", a, x, 4, "(r, C, kh, kw)")
    _check_factor(name, "B", b, x, 2, "(O, r)")
    if a.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: A expects {a.shape[1]} input channels but x has {x.shape[1]}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"{name}: B has {b.shape[1]} columns but A has r={a.shape[0]} rows")
    _check_bias(name, bias, b.shape[0], x)
    per_sample = _per_sample(out_idx)
    if per_sample:
        _check_rows(name, "out", out_idx, out_count, x.shape[0], b.shape[0], x.device)
    else:
        _check_count(name, out_idx, out_count, False, b.shape[0], x.device)
    for i, label in ((0, "height"), (1, "width")):
        extent = dilation[i] * (a.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < extent:
            raise ValueError(f"{name}: input {label} {x.shape[2 + i]} (padded {x.shape[2 + i] + 2 * padding[i]}) "
                             f"is smaller than the dilated kernel extent {extent}")
    backend = _backend_arg("sketch_conv2d", x)
    if per_sample:
        # Per-sample rows (MILF with per-sample selection): the whole chain, then each sample's mask. The rows of B
        # are r multiply-adds per output element against C kh kw r for the first stage, so computing them all costs
        # little; the mask makes the outputs and the B / bias gradients of each sample's inactive rows exactly zero.
        y = sketch_conv2d(x, a, b, bias, None, stride, padding, dilation)
        return y * _library.rows_mask(out_idx, out_count, b.shape[0], y.dtype)[:, :, None, None]
    args = (x, a, b, bias, out_idx, out_count, stride, padding, dilation, backend)
    if _library.eager(x, a, b, bias, out_idx, out_count):
        return _library.SketchConv2dFunction.apply(*args)[0]
    return _library.sketch_conv2d(*args)[0]


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
    x, a, b, bias = _autocast(x, a, b, bias)
    _check_factor(name, "A", a, x, 2, "(r, in)")
    _check_factor(name, "B", b, x, 2, "(out, r)")
    if a.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: A expects {a.shape[1]} input features but x has {x.shape[-1]}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"{name}: B has {b.shape[1]} columns but A has r={a.shape[0]} rows")
    _check_bias(name, bias, b.shape[0], x)
    _check_index(name, "out_idx", out_idx, b.shape[0], x.device)
    backend = _backend_arg("sketch_linear", x)
    args = (x, a, b, bias, out_idx, backend)
    if _library.eager(x, a, b, bias, out_idx):
        return _library.SketchLinearFunction.apply(*args)[0]
    return _library.sketch_linear(*args)[0]


__all__ = [
    "active_conv2d",
    "active_indices",
    "alsh_active_set",
    "hash_histogram",
    "sketch_conv2d",
    "sketch_linear",
]
