"""tritonslide.ops.active_conv2d against the masked dense reference, forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close
from tritonslide import ops, use_backend

# (N, C, H, W, O, kh, kw, stride, padding, dilation): shapes that are not powers of two, AlexNet-like geometry
SHAPES = [
    (3, 7, 11, 9, 13, 3, 3, 1, 1, 1),
    (2, 5, 23, 19, 6, 11, 11, 4, 2, 1),
    (2, 6, 13, 14, 9, 5, 5, 1, 2, 1),
    (1, 4, 9, 10, 5, 3, 2, 2, (1, 0), (2, 1)),
    (2, 9, 7, 7, 11, 1, 1, 1, 0, 1),
]


def masked_reference(x, w, b, out_idx, in_idx, stride, padding, dilation):
    """The definition: conv2d(x * m_in, W, b) * m_out."""
    m_in = torch.zeros(x.shape[1], dtype=x.dtype)
    m_out = torch.zeros(w.shape[0], dtype=x.dtype)
    m_in[in_idx if in_idx is not None else slice(None)] = 1
    m_out[out_idx if out_idx is not None else slice(None)] = 1
    y = F.conv2d(x * m_in.view(1, -1, 1, 1), w, b, stride, padding, dilation)
    return y * m_out.view(1, -1, 1, 1)


def random_idx(n, frac, gen):
    k = max(1, round(n * frac))
    return torch.randperm(n, generator=gen)[:k].sort().values


def run_both(dtype, shape, out_frac, in_frac, with_bias=True, seed=0):
    n, c, h, w_, o, kh, kw, stride, padding, dilation = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w_, generator=gen).to(dtype)
    w = (torch.randn(o, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5).to(dtype)
    b = torch.randn(o, generator=gen).to(dtype) if with_bias else None
    out_idx = None if out_frac is None else random_idx(o, out_frac, gen)
    in_idx = None if in_frac is None else random_idx(c, in_frac, gen)
    gy = torch.randn(n, o, *F.conv2d(x, w, None, stride, padding, dilation).shape[2:], generator=gen).to(dtype)

    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    y = ops.active_conv2d(leaves[0], leaves[1], leaves[2] if with_bias else None, out_idx, in_idx, stride, padding,
                          dilation)
    y.backward(gy)

    ref_leaves = [t.double().clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    y_ref = masked_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, out_idx, in_idx,
                             stride, padding, dilation)
    y_ref.backward(gy.double())
    return y, leaves, y_ref, ref_leaves, (c * kh * kw, n * y.shape[2] * y.shape[3]), out_idx, in_idx


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fracs", [(0.5, None), (0.4, 0.6), (None, 0.5), (None, None), (1.0, 1.0)])
def test_forward_and_gradients_match_masked_reference(shape, dtype, fracs):
    y, leaves, y_ref, ref_leaves, (k_red, s_red), out_idx, in_idx = run_both(dtype, shape, *fracs)
    assert y.dtype == dtype
    assert_close(y, y_ref.detach(), dtype, reduction=k_red)
    assert_close(leaves[0].grad, ref_leaves[0].grad, dtype, reduction=shape[4] * shape[5] * shape[6])
    assert_close(leaves[1].grad, ref_leaves[1].grad, dtype, reduction=s_red)
    assert_close(leaves[2].grad, ref_leaves[2].grad, dtype, reduction=s_red)
    # the contract, exactly: zeros outside the active rows / channels
    if out_idx is not None:
        inactive = torch.ones(shape[4], dtype=torch.bool)
        inactive[out_idx] = False
        assert (y[:, inactive] == 0).all()
        assert (leaves[1].grad[inactive] == 0).all() and (leaves[2].grad[inactive] == 0).all()
    if in_idx is not None:
        off = torch.ones(shape[1], dtype=torch.bool)
        off[in_idx] = False
        assert (leaves[0].grad[:, off] == 0).all() and (leaves[1].grad[:, off] == 0).all()


def test_no_bias_and_gradcheck_float64():
    shape = (2, 3, 6, 5, 4, 3, 2, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    out_idx, in_idx = torch.tensor([0, 2, 3]), torch.tensor([1, 2])
    assert torch.autograd.gradcheck(lambda x, w, b: ops.active_conv2d(x, w, b, out_idx, in_idx, 1, 1), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.active_conv2d(x, w, None, out_idx, None, 2, 0), (x, w))
    y, leaves, y_ref, ref_leaves, *_ = run_both(torch.float64, shape, 0.5, 0.5, with_bias=False)
    assert_close(y, y_ref.detach())
    assert_close(leaves[1].grad, ref_leaves[1].grad)


def test_empty_active_sets_and_empty_batch():
    x = torch.randn(2, 5, 8, 8, requires_grad=True)
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    none = torch.empty(0, dtype=torch.int64)
    y = ops.active_conv2d(x, w, b, none, None, padding=1)
    assert y.shape == (2, 6, 8, 8) and (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()
    # no active input channel: only the bias of the active rows remains
    out_idx = torch.tensor([1, 4])
    y = ops.active_conv2d(x, w, b, out_idx, none, padding=1)
    expected = torch.zeros(2, 6, 8, 8)
    expected[:, out_idx] = b[out_idx].detach().view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    # empty batch
    x0 = torch.randn(0, 5, 8, 8, requires_grad=True)
    y0 = ops.active_conv2d(x0, w, b, out_idx, None, padding=1)
    assert y0.shape == (0, 6, 8, 8)
    y0.sum().backward()
    assert x0.grad.shape == x0.shape


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"x": torch.randn(5, 8, 8)}, ValueError, r"shape \(N, C, H, W\)"),
        ({"x": torch.randn(2, 4, 8, 8)}, ValueError, "input channels"),
        ({"x": torch.randint(0, 3, (2, 5, 8, 8))}, TypeError, "floating-point"),
        ({"x": torch.randn(2, 5, 8, 8, dtype=torch.float64)}, TypeError, "weight is torch.float32"),
        ({"out_idx": torch.tensor([0, 9])}, ValueError, r"out_idx must lie in \[0, 6\)"),
        ({"out_idx": torch.tensor([3, 1])}, ValueError, "sorted and unique"),
        ({"out_idx": torch.tensor([1, 1])}, ValueError, "sorted and unique"),
        ({"in_idx": torch.tensor([0.0])}, TypeError, "1-d int64"),
        ({"bias": torch.randn(5)}, ValueError, "bias of shape"),
        ({"x": torch.randn(2, 5, 1, 1)}, ValueError, "smaller than the dilated kernel"),
        ({"stride": 0}, ValueError, "stride"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, exc, match):
    args = {"x": torch.randn(2, 5, 8, 8), "weight": torch.randn(6, 5, 3, 3), "bias": torch.randn(6)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.active_conv2d(**args)


def test_backend_choice_is_recorded_for_backward():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with use_backend("torch"):
        y = ops.active_conv2d(x, w, None, torch.tensor([0, 3]))
    y.sum().backward()  # runs outside the context: the Function kept the backend it was given
    assert w.grad[[1, 2]].abs().sum() == 0 and w.grad[[0, 3]].abs().sum() > 0


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_input_and_output_are_the_definition_without_zero_channels(shape, dtype):
    """Alg. 6 form: x holds only the channels in_idx, y only the rows out_idx; same values and gradients."""
    n, c, h, w_, o, kh, kw, stride, padding, dilation = shape
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(n, c, h, w_, generator=gen, dtype=dtype)
    w = torch.randn(o, c, kh, kw, generator=gen, dtype=dtype) / (c * kh * kw) ** 0.5
    b = torch.randn(o, generator=gen, dtype=dtype)
    out_idx, in_idx = random_idx(o, 0.5, gen), random_idx(c, 0.6, gen)
    xc = x.index_select(1, in_idx).requires_grad_()
    wc, bc = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = ops.active_conv2d(xc, wc, bc, out_idx, in_idx, stride, padding, dilation,
                          compact_input=True, compact_output=True)
    assert y.shape[1] == out_idx.numel()
    xf, wf, bf = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y_full = masked_reference(xf, wf, bf, out_idx, in_idx, stride, padding, dilation)
    assert_close(y, y_full.index_select(1, out_idx).detach(), dtype, reduction=c * kh * kw)
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    y.backward(g)
    y_full.backward(torch.zeros_like(y_full).index_copy_(1, out_idx, g))
    assert_close(xc.grad, xf.grad.index_select(1, in_idx), dtype, reduction=o * kh * kw)
    assert_close(wc.grad, wf.grad, dtype, reduction=n * y.shape[2] * y.shape[3])
    assert_close(bc.grad, bf.grad, dtype, reduction=n * y.shape[2] * y.shape[3])
    # one compact side at a time
    y_in = ops.active_conv2d(xc.detach(), w, b, out_idx, in_idx, stride, padding, dilation, compact_input=True)
    assert_close(y_in, y_full.detach(), dtype, reduction=c * kh * kw)
    with pytest.raises(ValueError, match="compact_input=True needs in_idx"):
        ops.active_conv2d(xc.detach(), w, b, out_idx, None, stride, padding, dilation, compact_input=True)
    with pytest.raises(ValueError, match=r"len\(in_idx\)"):
        ops.active_conv2d(x, w, b, out_idx, in_idx, stride, padding, dilation, compact_input=True)


def test_out_count_with_a_padded_index_equals_the_exact_set():
    """ops.alsh_active_set's (idx, count) form: the first count entries are the set, the rest is padding."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True)
    exact = torch.tensor([1, 4, 5, 9])
    padded = torch.cat([exact, torch.tensor([0, 2, 3, 6, 7, 8, 10])])
    in_idx = torch.tensor([0, 2, 3])
    y = ops.active_conv2d(x, w, b, exact, in_idx, 1, 1)
    y_pad = ops.active_conv2d(x, w, b, padded, in_idx, 1, 1, out_count=torch.tensor(4))
    torch.testing.assert_close(y_pad, y, rtol=0, atol=0)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, w, b), g)
    grads_pad = torch.autograd.grad(y_pad, (x, w, b), g)
    for a, e in zip(grads_pad, grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.testing.assert_close(masked_reference(x, w, b, exact, in_idx, (1, 1), (1, 1), (1, 1)), y)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"out_count": torch.tensor(2), "compact_output": True}, ValueError, "out_count needs compact_output=False"),
    ({"out_count": torch.tensor(2), "out_idx": None}, ValueError, "out_count needs out_idx"),
    ({"out_count": torch.tensor(2.0)}, TypeError, "out_count to be a 0-d int64 tensor"),
    ({"out_count": torch.tensor(9)}, ValueError, r"out_count=9 must lie in \[0, len\(out_idx\)=5\]"),
    ({"out_count": torch.tensor(3), "out_idx": torch.tensor([4, 1, 2, 0, 3])}, ValueError, "sorted and unique"),
])
def test_out_count_bad_input(kwargs, exc, match):
    args = {"out_idx": torch.tensor([0, 1, 2, 3, 4])} | kwargs
    with pytest.raises(exc, match=match):
        ops.active_conv2d(torch.randn(1, 3, 6, 6), torch.randn(5, 3, 3, 3), **args)
