"""tritonslide.ops.sketch_conv2d / sketch_linear against the explicit dense weight B @ A, every gradient."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close
from tritonslide import ops

CONV_CASES = [  # (N, C, H, W, r, O, kh, kw, stride, padding, dilation)
    (3, 7, 11, 9, 5, 13, 3, 3, 1, 1, 1),
    (2, 3, 23, 19, 9, 10, 11, 11, 4, 2, 1),
    (2, 6, 13, 12, 17, 9, 5, 5, 2, 2, 1),
    (1, 5, 10, 9, 3, 6, 3, 2, (2, 1), (1, 0), (2, 1)),
]


def conv_reference(x, a, b, bias, out_idx, stride, padding, dilation):
    """Deliberately explicit: form the full weight, convolve, mask the inactive output channels."""
    w = (b @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
    y = F.conv2d(x, w, bias, stride, padding, dilation)
    if out_idx is not None:
        mask = torch.zeros(b.shape[0], dtype=x.dtype)
        mask[out_idx] = 1
        y = y * mask.view(1, -1, 1, 1)
    return y


def _leaves(tensors, dtype):
    return [t.to(dtype).clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:8])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("active", [None, 0.5])
def test_sketch_conv2d_matches_dense_reference(case, dtype, active):
    n, c, h, w, r, o, kh, kw, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, c, h, w, generator=gen)
    a = torch.randn(r, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5
    b = torch.randn(o, r, generator=gen) / r**0.5
    bias = torch.randn(o, generator=gen)
    out_idx = None if active is None else torch.randperm(o, generator=gen)[: max(1, o // 2)].sort().values
    leaves = _leaves((x, a, b, bias), dtype)
    y = ops.sketch_conv2d(*leaves, out_idx, stride, padding, dilation)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy.to(dtype))
    ref = _leaves((x, a, b, bias), torch.float64)
    y_ref = conv_reference(*ref, out_idx, stride, padding, dilation)
    y_ref.backward(gy.double())
    spatial = n * y.shape[2] * y.shape[3]
    assert y.dtype == dtype
    assert_close(y, y_ref.detach(), dtype, reduction=c * kh * kw * r)
    for got, want, red in zip(
        (t.grad for t in leaves), (t.grad for t in ref), (o * r * kh * kw, spatial * o, spatial * c * kh * kw, spatial)
    ):
        assert_close(got, want, dtype, reduction=red)
    if out_idx is not None:
        off = torch.ones(o, dtype=torch.bool)
        off[out_idx] = False
        assert (y[:, off] == 0).all() and (leaves[2].grad[off] == 0).all() and (leaves[3].grad[off] == 0).all()


def test_sketch_conv2d_gradcheck():
    gen = torch.Generator().manual_seed(5)
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in ((2, 3, 6, 5), (4, 3, 3, 2), (5, 4), (5,))]
    out_idx = torch.tensor([0, 2, 3])
    assert torch.autograd.gradcheck(lambda *t: ops.sketch_conv2d(*t, out_idx, 2, 1), args)
    assert torch.autograd.gradcheck(lambda x, a, b: ops.sketch_conv2d(x, a, b, None, None, 1, (1, 0), 2), args[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lead", [(7,), (2, 5), ()])
@pytest.mark.parametrize("active", [None, 0.4])
def test_sketch_linear_matches_dense_reference(dtype, lead, active):
    gen = torch.Generator().manual_seed(6)
    d_in, r, d_out = 23, 9, 17
    x = torch.randn(*lead, d_in, generator=gen)
    a = torch.randn(r, d_in, generator=gen) / d_in**0.5
    b = torch.randn(d_out, r, generator=gen) / r**0.5
    bias = torch.randn(d_out, generator=gen)
    out_idx = None if active is None else torch.tensor([1, 4, 5, 11, 16])
    leaves = _leaves((x, a, b, bias), dtype)
    y = ops.sketch_linear(*leaves, out_idx)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy.to(dtype))
    ref = _leaves((x, a, b, bias), torch.float64)
    y_ref = F.linear(ref[0], ref[2] @ ref[1], ref[3])
    if out_idx is not None:
        mask = torch.zeros(d_out, dtype=torch.float64)
        mask[out_idx] = 1
        y_ref = y_ref * mask
    y_ref.backward(gy.double())
    m = max(1, x[..., 0].numel())
    assert_close(y, y_ref.detach(), dtype, reduction=d_in * r)
    for got, want, red in zip((t.grad for t in leaves), (t.grad for t in ref), (d_out * r, m * d_out, m * d_in, m)):
        assert_close(got, want, dtype, reduction=red)


def test_sketch_linear_gradcheck():
    gen = torch.Generator().manual_seed(8)
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in ((3, 6), (4, 6), (5, 4), (5,))]
    assert torch.autograd.gradcheck(lambda *t: ops.sketch_linear(*t, torch.tensor([1, 3])), args)
    assert torch.autograd.gradcheck(lambda *t: ops.sketch_linear(*t), args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"a": torch.randn(4, 2, 3, 3)}, ValueError, "A expects 2 input channels"),
        ({"b": torch.randn(6, 5)}, ValueError, "B has 5 columns but A has r=4"),
        ({"b": torch.randn(6, 4, 1)}, ValueError, r"B of shape \(O, r\)"),
        ({"a": torch.randn(4, 3, 3, 3, dtype=torch.float64)}, TypeError, "A is torch.float64"),
        ({"bias": torch.randn(5)}, ValueError, "bias of shape"),
        ({"out_idx": torch.tensor([7])}, ValueError, "out_idx must lie"),
        ({"x": torch.randn(2, 3, 2, 2)}, ValueError, "smaller than the dilated kernel"),
    ],
)
def test_sketch_conv2d_bad_input(kwargs, exc, match):
    args = {"x": torch.randn(2, 3, 8, 8), "a": torch.randn(4, 3, 3, 3), "b": torch.randn(6, 4), "bias": None}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.sketch_conv2d(**args)


def test_sketch_linear_bad_input():
    with pytest.raises(ValueError, match="A expects 5 input features"):
        ops.sketch_linear(torch.randn(2, 4), torch.randn(3, 5), torch.randn(6, 3))
    with pytest.raises(TypeError, match="floating-point"):
        ops.sketch_linear(torch.ones(2, 5, dtype=torch.int64), torch.randn(3, 5), torch.randn(6, 3))


def test_empty_out_idx_gives_zero_outputs_and_gradients():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = ops.sketch_conv2d(x, a, b, bias, torch.empty(0, dtype=torch.int64), 1, 1)
    assert y.shape == (2, 5, 6, 5) and not y.any()
    for g in torch.autograd.grad(y, (x, a, b, bias), torch.randn(y.shape, generator=gen, dtype=torch.float64)):
        assert not g.any()
