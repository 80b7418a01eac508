"""LowRankConv2d against plain references: per-slice / reshaped-kernel SVDs in numpy, loops forming the kernel from
the factors, and F.conv2d on that kernel."""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tritonslide
from tests.tolerances import assert_close
from tritonslide import LowRankConfig
from tritonslide.nn import LowRankConv2d


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every shape here is tiny: intra-op threads only add wake-up latency. On the shared 2-core box this file took
    2.5 s with one thread against 5-38 s with two (OpenMP waits when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (C, O, kh, kw, stride, padding, dilation, H, W): unaligned shapes, non-square kernels, stride 2, asymmetric
# padding and dilation
GEOMETRIES = [
    (5, 7, 3, 3, 1, 1, 1, 11, 9),
    (3, 6, 5, 3, (2, 1), (2, 0), (1, 2), 13, 12),
    (6, 5, 3, 4, 2, (0, 3), (2, 1), 15, 10),
    (7, 3, 3, 5, (1, 3), (1, 2), 1, 9, 14),
    (4, 9, 1, 1, 1, 0, 1, 7, 6),
]
# (scheme, forced 'filter' path): both computations of the 'filter' scheme are checked on every geometry
VARIANTS = [("channel", None), ("filter", "separable"), ("filter", "dense")]


def gid(g):
    return "-".join(str(v).replace(" ", "") for v in g)


def vid(v):
    return v[0] if v[1] is None else f"{v[0]}-{v[1]}"


def make_layer(conv, scheme, path, rank):
    layer = LowRankConv2d.from_dense(conv, LowRankConfig(rank=rank, scheme=scheme))
    if path is not None:
        layer._filter_path = path
    return layer


def reference_weight(scheme, vertical, horizontal):
    """Plain loops: the kernel as a sum of outer products (sec. VIII), one 2-D slice at a time."""
    if scheme == "filter":
        o, c, r, _ = vertical.shape
        rows = [
            torch.stack([sum(torch.outer(vertical[i, k, j], horizontal[i, k, j]) for j in range(r))
                         for k in range(c)])
            for i in range(o)
        ]
        return torch.stack(rows)
    r, c = vertical.shape[:2]
    o = horizontal.shape[0]
    rows = [
        torch.stack([sum(torch.outer(vertical[j, k, :, 0], horizontal[i, j, 0, :]) for j in range(r))
                     for k in range(c)])
        for i in range(o)
    ]
    return torch.stack(rows)


def numpy_truncation(weight, scheme, rank):
    """Truncated SVD in numpy: per (o, c) slice for 'filter', of M[(c, y), (o, x)] for 'channel'.
    Returns the rank-r kernel and the dropped singular values."""
    w = weight.detach().double().numpy()
    o, c, kh, kw = w.shape
    if scheme == "filter":
        out, dropped = np.zeros_like(w), []
        for i in range(o):
            for k in range(c):
                u, s, vt = np.linalg.svd(w[i, k])
                out[i, k] = (u[:, :rank] * s[:rank]) @ vt[:rank]
                dropped.extend(s[rank:])
        return out, np.array(dropped)
    m = w.transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    m_r = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return m_r.reshape(c, kh, o, kw).transpose(2, 0, 1, 3), s[rank:]


def conv_of(geom, dtype=torch.float32, bias=True):
    c, o, kh, kw, s, p, d, _, _ = geom
    return nn.Conv2d(c, o, (kh, kw), s, p, d, bias=bias, dtype=dtype)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=gid)
def test_full_rank_equals_the_dense_conv(geom, variant):
    """At full rank the factors reproduce the kernel (sec. IX with m = full rank): same output, same input and
    bias gradients as the nn.Conv2d it came from."""
    c, o, kh, kw, *_, h, w = geom
    conv = conv_of(geom)
    layer = make_layer(copy.deepcopy(conv), *variant, rank=10_000)
    assert layer.rank == layer.full_rank == (min(kh, kw) if variant[0] == "filter" else min(c * kh, o * kw))
    assert_close(layer.reconstructed_weight(), conv.weight.detach(), reduction=layer.rank)
    x = torch.randn(3, c, h, w)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), conv(x2)
    assert_close(y, y_ref.detach(), reduction=c * kh * kw)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x1.grad, x2.grad, reduction=o * kh * kw)
    assert_close(layer.bias.grad, conv.bias.grad, reduction=3 * y.shape[2] * y.shape[3])


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=gid)
@pytest.mark.parametrize("rank", [1, 2])
def test_forward_and_every_gradient_match_conv_with_the_reconstructed_kernel(geom, variant, rank):
    """Truncated factors: output, dx, d(vertical), d(horizontal) and d(bias) against F.conv2d on the kernel formed
    by plain loops from copies of the factors (autograd through the loops gives the reference factor grads)."""
    c, o, kh, kw, s, p, d, h, w = geom
    layer = make_layer(conv_of(geom), *variant, rank=rank)
    ref_v = layer.vertical.detach().clone().requires_grad_()
    ref_h = layer.horizontal.detach().clone().requires_grad_()
    ref_b = layer.bias.detach().clone().requires_grad_()
    x = torch.randn(2, c, h, w)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1)
    y_ref = F.conv2d(x2, reference_weight(variant[0], ref_v, ref_h), ref_b, s, p, d)
    assert_close(y, y_ref.detach(), reduction=c * kh * kw)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    n_out = 2 * y.shape[2] * y.shape[3]
    assert_close(x1.grad, x2.grad, reduction=o * kh * kw)
    assert_close(layer.vertical.grad, ref_v.grad, reduction=n_out * o * kh * kw)
    assert_close(layer.horizontal.grad, ref_h.grad, reduction=n_out * c * kh * kw)
    assert_close(layer.bias.grad, ref_b.grad, reduction=n_out)


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("rank", [1, 3])
def test_gradcheck_float64(variant, rank):
    conv = nn.Conv2d(2, 3, (3, 2), (2, 1), (1, 0), (1, 2), dtype=torch.float64)
    layer = make_layer(conv, *variant, rank=rank)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in (layer.vertical, layer.horizontal, layer.bias)]

    def f(x, v, h, b):
        return torch.func.functional_call(layer, {"vertical": v, "horizontal": h, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


# ---------------------------------------------------------------------------------------------- the truncation
@pytest.mark.parametrize("scheme", ["filter", "channel"])
@pytest.mark.parametrize("shape, rank", [((7, 5, 5, 5), 1), ((7, 5, 5, 5), 3), ((6, 4, 3, 4), 2), ((3, 2, 3, 3), 4)])
def test_truncation_is_the_plain_svd_best_approximation(scheme, shape, rank):
    """reconstructed_weight equals the numpy truncated SVD (per slice / of the reshaped kernel), its Frobenius
    error is sqrt(sum of the dropped squared singular values) (Eckart-Young, sec. IX), it has rank <= r, and no
    rank-r kernel of the same structure found by projecting on random subspaces does better."""
    o, c, kh, kw = shape
    conv = nn.Conv2d(c, o, (kh, kw), dtype=torch.float64)
    layer = LowRankConv2d.from_dense(conv, LowRankConfig(rank=rank, scheme=scheme))
    expected, dropped = numpy_truncation(conv.weight, scheme, layer.rank)
    got = layer.reconstructed_weight().detach()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    error = float((got - conv.weight.detach()).norm())
    assert error == pytest.approx(math.sqrt(float((dropped**2).sum())), rel=1e-9, abs=1e-12)
    w = conv.weight.detach()
    if scheme == "filter":
        assert int(torch.linalg.matrix_rank(got).max()) <= layer.rank
        mats = w  # (O, C, kh, kw): project every slice's columns on a random r-dim subspace
    else:
        assert int(torch.linalg.matrix_rank(got.permute(1, 2, 0, 3).reshape(c * kh, o * kw))) <= layer.rank
        mats = w.permute(1, 2, 0, 3).reshape(c * kh, o * kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        q, _ = torch.linalg.qr(torch.randn(*mats.shape[:-2], mats.shape[-2], layer.rank, generator=gen,
                                           dtype=torch.float64))
        assert float((mats - q @ q.transpose(-1, -2) @ mats).norm()) >= error - 1e-12


def test_rank_is_capped_and_factor_shapes_follow_the_scheme():
    layer = LowRankConv2d(4, 6, (3, 2), config=LowRankConfig(rank=5, scheme="filter"))
    assert (layer.rank, layer.full_rank) == (2, 2)
    assert layer.vertical.shape == (6, 4, 2, 3) and layer.horizontal.shape == (6, 4, 2, 2)
    layer = LowRankConv2d(4, 6, (3, 2), config=LowRankConfig(rank=20, scheme="channel"))
    assert (layer.rank, layer.full_rank) == (12, 12)  # min(C*kh, O*kw) = min(12, 12)
    assert layer.vertical.shape == (12, 4, 3, 1) and layer.horizontal.shape == (6, 12, 1, 2)
    assert LowRankConv2d(4, 6, 3, config=LowRankConfig(rank=7)).rank == 7


# ---------------------------------------------------------------------------------------------- training from scratch
@pytest.mark.parametrize("scheme", ["filter", "channel"])
def test_init_has_the_dense_init_scale(scheme):
    """nn.Conv2d draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)): E||W||_F^2 = numel / (3 fan_in). The reconstructed
    kernel keeps the norm of such a draw (relative std of ||W||^2 is sqrt(0.8 / numel) ~ 0.7%: 5% is > 6 sigma)."""
    c, o, k = 48, 40, 3
    layer = LowRankConv2d(c, o, k, config=LowRankConfig(rank=2, scheme=scheme))
    w = layer.reconstructed_weight().detach()
    expected = math.sqrt(w.numel() / (3 * c * k * k))
    assert float(w.norm()) == pytest.approx(expected, rel=0.05)
    bound = 1 / math.sqrt(c * k * k)
    assert float(layer.bias.detach().abs().max()) <= bound and float(layer.bias.detach().std()) > bound / 4
    other = LowRankConv2d(c, o, k, config=LowRankConfig(rank=2, scheme=scheme))
    assert not torch.equal(other.vertical, layer.vertical)  # drawn from the global RNG, like nn.Conv2d


@pytest.mark.parametrize("scheme", ["filter", "channel"])
def test_trains_from_scratch(scheme):
    """The factors are Parameters: fitting a conv whose kernel has the layer's structure from a fresh init reduces
    the loss 100x in 100 Adam steps (over 1000x measured for both schemes)."""
    gen = torch.Generator().manual_seed(1)
    teacher = LowRankConv2d(4, 6, 3, padding=1, config=LowRankConfig(rank=2, scheme=scheme))
    layer = LowRankConv2d(4, 6, 3, padding=1, config=LowRankConfig(rank=2, scheme=scheme))
    opt = torch.optim.Adam(layer.parameters(), lr=0.03)
    x = torch.randn(16, 4, 7, 7, generator=gen)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100


# ---------------------------------------------------------------------------------------------- costs
def conv_macs_counted(layer, x):
    """Multiply-adds of the convolutions the forward runs, per sample, counted by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_flop_counts()["Global"][torch.ops.aten.convolution] // 2 // x.shape[0]


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("geom", [GEOMETRIES[0], (3, 6, 5, 3, 2, (1, 2), (1, 2), 13, 13)], ids=gid)
def test_macs_match_what_the_forward_runs(geom, variant):
    """macs() against torch's count of the convolutions actually run (input widths consistent with stride)."""
    c, *_, h, w = geom
    layer = make_layer(conv_of(geom), *variant, rank=2)
    y = layer(torch.randn(2, c, h, w))
    assert conv_macs_counted(layer, torch.randn(2, c, h, w)) == layer.macs(*y.shape[2:])
    assert layer.dense_macs(*y.shape[2:]) == layer.reconstructed_weight().numel() * y.shape[2] * y.shape[3]


def test_costs_of_a_vgg_layer():
    """256 -> 256 3x3 at 32x32 (padding 1): the hand formulas of the module docstring."""
    hw = 32 * 32
    dense = 256 * 256 * 9 * hw
    for r in (8, 16, 32):
        ch = LowRankConv2d(256, 256, 3, padding=1, config=LowRankConfig(rank=r, scheme="channel"), _init_weights=False)
        assert ch.param_count() == r * (256 * 3 + 256 * 3) + 256
        assert ch.macs(32, 32) == r * 256 * 3 * hw + 256 * r * 3 * hw and ch.dense_macs(32, 32) == dense
        flt = LowRankConv2d(256, 256, 3, padding=1, config=LowRankConfig(rank=r, scheme="filter"), _init_weights=False)
        assert flt.param_count() == 256 * 256 * 3 * (3 + 3) + 256
        assert flt._filter_path == "dense" and flt.macs(32, 32) == dense  # r = min(r, 3) = 3: 18 > 9 MACs/pixel
    rank1 = LowRankConv2d(256, 256, 3, padding=1, config=LowRankConfig(rank=1, scheme="filter"), _init_weights=False)
    assert rank1._filter_path == "dense"  # 6 < 9 MACs per pixel, but it would keep 256x the output
    paper = LowRankConv2d(1, 1, 5, config=LowRankConfig(rank=2, scheme="filter"))  # the paper's 5x5 single filter
    assert paper._filter_path == "separable" and paper.macs(28, 28) == 2 * (5 * 28 * 32 + 5 * 28 * 28)


def test_summary_reports_the_layer_costs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
    tritonslide.patch(model, LowRankConfig(rank=4))
    row = next(r for r in tritonslide.summary(model, (2, 3, 9, 7)).layers if r.name == "2")
    assert row.method == "lowrank" and row.params_before == 12 * 8 * 9 + 12
    assert row.params_after == 4 * (8 * 3 + 12 * 3) + 12 and row.macs_after == model[2].macs(9, 7)


# ---------------------------------------------------------------------------------------------- module behaviour
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 9, (3, 2), 2, (1, 0)))
        self.head = nn.Conv2d(9, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(self.stem(x))))


@pytest.mark.parametrize("config", ["lowrank", LowRankConfig(rank=2, scheme="filter"), LowRankConfig(rank=3)])
def test_patch_unpatch_and_patch_twice(config):
    model = Net()
    x = torch.randn(2, 3, 9, 8)
    tritonslide.patch(model, config)
    assert type(model.stem) is nn.Conv2d  # the first conv stays dense
    layers = [model.body[0], model.body[2], model.head]
    assert all(isinstance(m, LowRankConv2d) for m in layers)
    assert [m._name for m in layers] == ["body.0", "body.2", "head"]
    assert model.body[2].stride == (2, 2) and model.body[2].padding == (1, 0)
    before_modules = dict(model.named_modules())
    before_state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    tritonslide.patch(model, config)
    assert dict(model.named_modules()) == before_modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())
    y = model(x)
    biases = [m.bias for m in layers]
    weights = [m.reconstructed_weight().detach() for m in layers]
    tritonslide.unpatch(model)
    dense = [model.body[0], model.body[2], model.head]
    assert all(type(m) is nn.Conv2d for m in dense)
    assert all(m.bias is b for m, b in zip(dense, biases))
    assert all(torch.equal(m.weight, w) for m, w in zip(dense, weights))
    assert_close(model(x), y.detach(), reduction=10 * 9)


def test_state_dict_round_trip_into_a_freshly_patched_copy():
    model = tritonslide.patch(Net(), LowRankConfig(rank=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = tritonslide.patch(Net(), LowRankConfig(rank=2))
    assert not torch.equal(fresh.head.vertical, model.head.vertical)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    assert "body.0._extra_state" in model.state_dict()


def test_state_dict_from_a_different_config_is_refused():
    state = tritonslide.patch(Net(), LowRankConfig(rank=50)).state_dict()
    other = tritonslide.patch(Net(), LowRankConfig(rank=60))  # both capped at the same full ranks: same shapes
    assert all(a.shape == b.shape for a, b in zip(state.values(), other.state_dict().values())
               if isinstance(a, torch.Tensor))
    with pytest.raises(ValueError, match=r"LowRankConv2d 'body.0'.*saved with config.*'rank': 50"):
        other.load_state_dict(state)
    with pytest.raises((ValueError, RuntimeError)):
        tritonslide.patch(Net(), LowRankConfig(rank=50, scheme="filter")).load_state_dict(state)


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.randn(2, 3, 7), ValueError, r"expected 4 input channels|shape \(N, 4, H, W\)"),
        (torch.randn(2, 5, 7, 7), ValueError, r"expected 4 input channels, i.e. shape \(N, 4, H, W\)"),
        (torch.randn(2, 3, 4, 7, 7), ValueError, r"shape \(N, 4, H, W\)"),
        ([[1.0]], TypeError, "expected a torch.Tensor"),
        (torch.randn(2, 4, 7, 7, dtype=torch.float64), TypeError, "expected a torch.float32 input"),
        (torch.randn(2, 4, 2, 7), ValueError, "smaller than the kernel extent"),
        (torch.randn(2, 4, 7, 7, device="meta"), ValueError, "input is on meta"),
    ],
)
def test_bad_input_names_the_layer(x, exc, match):
    model = tritonslide.patch(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 3)), "lowrank")
    with pytest.raises(exc, match=match) as info:
        model[1](x)
    assert "LowRankConv2d '1'" in str(info.value)


def test_empty_batch_unbatched_input_and_float64():
    for variant in VARIANTS:
        layer = make_layer(nn.Conv2d(3, 5, 3, padding=(1, 2), stride=(1, 2)), *variant, rank=1)
        assert layer(torch.randn(0, 3, 7, 6)).shape == (0, 5, 7, 4)
        x = torch.randn(3, 7, 6)
        assert_close(layer(x), layer(x.unsqueeze(0))[0].detach(), reduction=27)
        layer = layer.to(torch.float64)
        assert layer.vertical.dtype == layer.horizontal.dtype == torch.float64
        assert layer(torch.randn(2, 3, 7, 6, dtype=torch.float64)).dtype == torch.float64
    layer = LowRankConv2d(3, 5, 3, bias=False)
    assert layer.bias is None and layer.to_dense().bias is None and layer.param_count() == 8 * (9 + 15)


def test_from_dense_checks_and_keeps_device_dtype_and_bias():
    conv = nn.Conv2d(4, 6, 3, padding="same")
    layer = LowRankConv2d.from_dense(conv, LowRankConfig(rank=12), name="blk")
    assert layer.bias is conv.bias and layer.padding == (1, 1) and layer.display_name() == "LowRankConv2d 'blk'"
    x = torch.randn(2, 4, 7, 5)
    assert_close(layer(x), conv(x).detach(), reduction=36)
    half = LowRankConv2d.from_dense(nn.Conv2d(4, 6, 3).to(torch.bfloat16), LowRankConfig(rank=2))
    assert half.vertical.dtype == half.horizontal.dtype == torch.bfloat16
    assert half(torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"from_dense\(g\).*groups=2"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2), name="g")
    with pytest.raises(TypeError, match="LowRankConfig"):
        LowRankConv2d(3, 4, 3, config="lowrank")
    with pytest.warns(UserWarning, match="transposed"):
        tritonslide.patch(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 3)), "lowrank")
