"""The registered custom ops (``torch.ops.tritonslide.*``): ``torch.library.opcheck`` on every op (schema, fake
implementation against the real one, autograd registration, AOT dispatch), and the eager path that skips their
dispatch gives the registered op's values and gradients."""

from __future__ import annotations

import pytest
import torch

from tritonslide import _library, ops

# shapes that are not powers of two; a channels_last case checks the memory formats the fakes promise
X_SHAPE, W_SHAPE = (2, 5, 9, 11), (7, 5, 3, 3)
CONV = ([1, 2], [1, 0], [1, 1])  # stride, padding, dilation


def _conv_inputs(channels_last: bool = False, grad: bool = True):
    x = torch.randn(X_SHAPE, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(W_SHAPE, dtype=torch.float64), torch.randn(W_SHAPE[0], dtype=torch.float64)
    for t in (x, w, b):
        t.requires_grad_(grad)
    return x, w, b


def _opcheck(op, args):
    # test_autograd_registration needs float inputs that require grad; the rest run for every op
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("sets", ["all", "exact", "padded", "compact"])
def test_opcheck_active_conv2d(sets, channels_last):
    x, w, b = _conv_inputs(channels_last)
    out_idx, in_idx, out_count, in_count, compact = None, None, None, None, False
    if sets == "exact":
        out_idx, in_idx = torch.tensor([0, 3, 6]), torch.tensor([1, 2, 4])
    elif sets == "padded":
        out_idx, out_count = torch.tensor([0, 3, 6, 1, 2, 4, 5]), torch.tensor(3)
        in_idx, in_count = torch.tensor([1, 2, 4, 0, 3]), torch.tensor(3)
    elif sets == "compact":
        out_idx, in_idx, compact = torch.tensor([0, 3, 6]), torch.tensor([1, 2, 4]), True
        x = x.detach()[:, [1, 2, 4]].requires_grad_()
    args = (x, w, b, out_idx, in_idx, out_count, in_count, *CONV, compact, compact, "torch", True)
    _opcheck(_library.active_conv2d, args)


def test_opcheck_active_conv2d_backward():
    x, w, _ = _conv_inputs(grad=False)
    grad_y = torch.randn(2, 7, 9, 5, dtype=torch.float64)
    args = (grad_y, x, w, torch.tensor([0, 3, 6]), None, None, None, *CONV, True, [True, True, True], False,
            False, "torch")
    _opcheck(_library.active_conv2d_backward, args)


@pytest.mark.parametrize("return_codes", [False, True])
def test_opcheck_hash_histogram(return_codes):
    x, planes = torch.randn(X_SHAPE), torch.randn(3 * 4, 5, 3, 3)
    _opcheck(_library.hash_histogram, (x, planes, 4, *CONV, torch.tensor([0, 2, 3]), None, return_codes, "torch"))


def test_opcheck_alsh_active_set_and_active_indices():
    hist = torch.randint(0, 40, (3, 16))
    codes = torch.randint(0, 16, (11, 3))
    _opcheck(_library.alsh_active_set, (hist, codes, 2, 1))
    idx, count = ops.alsh_active_set(hist, codes, 2)
    # a data-dependent output size: opcheck runs the fake with dynamic output shapes allowed
    _opcheck(_library.active_indices, (idx, count))


@pytest.mark.parametrize("out_count", [False, True])
def test_opcheck_sketch_conv2d(out_count):
    x, _, bias = _conv_inputs()
    a = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 4, 5, 0, 2, 3, 6]) if out_count else torch.tensor([1, 4, 5])
    count = torch.tensor(3) if out_count else None
    _opcheck(_library.sketch_conv2d, (x, a, b, bias, idx, count, *CONV, "torch"))


def test_opcheck_sketch_linear():
    x = torch.randn(3, 4, 13, dtype=torch.float64, requires_grad=True)
    a = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    _opcheck(_library.sketch_linear, (x, a, b, bias, torch.tensor([0, 5, 8]), "torch"))


def test_eager_path_equals_the_registered_op():
    """ops.* on plain tensors runs the implementation directly; the registered op (what traced code runs) gives
    the same values and gradients."""
    x, w, b = _conv_inputs()
    out_idx, in_idx = torch.tensor([0, 3, 6]), torch.tensor([1, 2, 4])
    y = ops.active_conv2d(x, w, b, out_idx, in_idx, *CONV)
    y_op = _library.active_conv2d(x, w, b, out_idx, in_idx, None, None, *CONV, False, False, "torch", True)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), (x, w, b))
    grads_op = torch.autograd.grad((y_op * g).sum(), (x, w, b))
    assert torch.equal(y, y_op) and all(torch.equal(p, q) for p, q in zip(grads, grads_op))
    a = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    z = ops.sketch_conv2d(x, a, bb, b, out_idx, *CONV)
    z_op = _library.sketch_conv2d(x, a, bb, b, out_idx, None, *CONV, "torch")[0]
    grads = torch.autograd.grad((z * g).sum(), (x, a, bb, b))
    grads_op = torch.autograd.grad((z_op * g).sum(), (x, a, bb, b))
    assert torch.equal(z, z_op) and all(torch.equal(p, q) for p, q in zip(grads, grads_op))


def test_index_values_are_checked_at_run_time_on_both_paths():
    x, w, _ = _conv_inputs(grad=False)
    bad = torch.tensor([0, 9])
    with pytest.raises(ValueError, match=r"active_conv2d: out_idx must lie in \[0, 7\)"):
        ops.active_conv2d(x, w, None, bad)
    with pytest.raises(ValueError, match=r"active_conv2d: out_idx must lie in \[0, 7\)"):
        _library.active_conv2d(x, w, None, bad, None, None, None, *CONV, False, False, "torch", False)
    with pytest.raises(ValueError, match=r"in_count=6 must lie in \[0, len\(in_idx\)=2\]"):
        ops.active_conv2d(x, w, None, None, torch.tensor([0, 1]), in_count=torch.tensor(6))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_expand_and_compact_rows_equal_a_loop(fmt):
    """expand_rows puts channel j of sample n at idx[n, j] (j < count[n]), zeros elsewhere, whatever lies past a
    count (NaN here, and padding entries that repeat an active index); compact_rows is its inverse."""
    g = torch.Generator().manual_seed(3)
    n, size, k, hw = 5, 11, 7, (4, 3)
    count = torch.tensor([7, 0, 3, 5, 1])
    idx = torch.zeros(n, k, dtype=torch.int64)
    for s, c in enumerate(count.tolist()):
        idx[s, :c] = torch.randperm(size, generator=g)[:c].sort().values
        idx[s, c:] = idx[s, 0] if c else 4  # padding that repeats an active index
    xc = torch.randn(n, k, *hw, generator=g)
    xc[torch.arange(k)[None, :] >= count[:, None]] = float("nan")
    full = _library.expand_rows(xc, idx, count, size, fmt)
    ref = torch.zeros(n, size, *hw)
    for s, c in enumerate(count.tolist()):
        for j in range(c):
            ref[s, idx[s, j]] = xc[s, j]
    assert torch.equal(full, ref)
    assert full.is_contiguous(memory_format=fmt)
    back = _library.compact_rows(full, idx, count)
    valid = torch.arange(k)[None, :] < count[:, None]
    assert torch.equal(back[valid], xc[valid]) and not back[~valid].any()
    # the gradient (a linked per-batch consumer expands a per-sample producer's output in training): each valid
    # entry gets its channel's gradient, entries past a count get zero
    xg = torch.where(valid[:, :, None, None], xc, 0).requires_grad_()
    g_full = torch.randn(n, size, *hw, generator=g)
    (grad,) = torch.autograd.grad(_library.expand_rows(xg, idx, count, size, fmt), xg, g_full)
    assert torch.equal(grad, _library.compact_rows(g_full, idx, count))
    # without counts every entry is in use
    rows = torch.stack([torch.randperm(size, generator=g)[:k] for _ in range(n)])
    assert torch.equal(_library.compact_rows(_library.expand_rows(xg, rows, None, size, fmt), rows, None), xg)
