"""SketchConv2d / SketchLinear against eq. 1 and eq. 4 of Kasiviswanathan et al. (shared/papers/004) written out.

The references form every kernel of eq. 1 from the definitions (the mode-4 product ``S1_i x_4 U1_i^T`` and the
``S2_i (.) U2_i^T`` sum, in the paper's (d2, h, w, d1) layout) and loop over the l pairs; gradients come from
autograd through them and, separately, from the closed forms of sec. 3.1.
"""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tests.tolerances import assert_close
from tritonslide.configs import SketchConfig
from tritonslide.nn import SketchConv2d, SketchLinear
from tritonslide.nn.sketch import sketch_weight_params

MODES = ("output", "input", "both")
DISTRIBUTIONS = ("sign", "uniform")
CONV_GEOMETRIES = [  # (C, O, (kh, kw), stride, padding, dilation, H, W, k, pairs)
    (5, 11, (3, 3), 1, 1, 1, 9, 7, 3, 2),
    (6, 9, (3, 2), (2, 1), (1, 0), (1, 2), 10, 11, 4, 3),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one intra-op thread is up to ~30x faster than the default on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def paper_kernels(layer):
    """Per pair i, K1_i = S1_i x_4 U1_i^T and K2_i = S2_i (.) U2_i^T as (d2, h, w, d1) tensors, from Def. 2 and the
    definition under eq. 1: (S2 (.) U2^T)_{xyzs} = sum_{c,i,j} S2_{cijs} U2_{(cij)(xyz)}. Storage: s1[i] holds
    mat_4(S1_i)^T, s2[i] holds mat_4(S2_i)^T, u2[i] is the (k h w) x (d2 h w) matrix U2_i."""
    cfg = layer.sketch_config
    c, kh, kw = layer.fan_in_shape
    o = layer._out
    k1, k2 = [], []
    for i in range(cfg.pairs):
        if layer.s1 is not None:
            s1 = layer.s1[i].permute(1, 2, 3, 0)  # (d2, h, w, k)
            k1.append(torch.einsum("xyzc,cs->xyzs", s1, layer.u1[i]))
        if layer.s2 is not None:
            s2 = layer.s2[i].t().reshape(cfg.k, kh, kw, o)  # (k, h, w, d1)
            u2 = layer.u2[i].reshape(cfg.k, kh, kw, c, kh, kw)
            k2.append(torch.einsum("cijs,cijxyz->xyzs", s2, u2))
    return k1, k2


def eq1_reference(layer, x):
    """Eq. 1: 1/(2l) sum_i I_in * K1_i + I_in * K2_i (1/l with one mode), plus the bias; dense F.conv2d per kernel."""
    k1, k2 = paper_kernels(layer)
    scale = 1 / (len(k1) + len(k2))
    y = 0
    for kernel in k1 + k2:
        y = y + scale * F.conv2d(x, kernel.permute(3, 0, 1, 2), None, layer.stride, layer.padding, layer.dilation)
    return y + (layer.bias.view(1, -1, 1, 1) if layer.bias is not None else 0)


def eq4_reference(layer, h):
    """Eq. 4 with explicit matrices: 1/(2l) sum_i U1_i^T S1_i h + S2_i U2_i h + b, one pair at a time."""
    cfg = layer.sketch_config
    terms = []
    for i in range(cfg.pairs):
        if layer.s1 is not None:
            terms.append(layer.u1[i].t() @ layer.s1[i] @ h.T)
        if layer.s2 is not None:
            terms.append(layer.s2[i] @ layer.u2[i] @ h.T)
    out = sum(terms) / len(terms)
    return out.T + (layer.bias if layer.bias is not None else 0)


def run_with_grads(module, x, fn, g):
    """(y, dL/dx, {name: dL/dparam}) of ``fn(module, x)`` for the output gradient ``g``."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = fn(module, x)
    y.backward(g)
    params = {n: p.grad.clone() for n, p in module.named_parameters()}
    return y.detach(), x.grad, params


@pytest.mark.parametrize("geom", CONV_GEOMETRIES, ids=lambda g: "x".join(map(str, g[:3])))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_conv_chain_equals_eq1_forward_and_every_gradient(geom, mode, distribution):
    c, o, kernel, stride, padding, dilation, h, w, k, pairs = geom
    cfg = SketchConfig(k=k, pairs=pairs, mode=mode, distribution=distribution, seed=3)
    layer = SketchConv2d(c, o, kernel, stride, padding, dilation, config=cfg)
    ref = copy.deepcopy(layer).double()
    x = torch.randn(3, c, h, w)
    g = torch.randn(layer.output_shape(3, h, w))
    y, dx, grads = run_with_grads(layer, x, lambda m, t: m(t), g)
    y_ref, dx_ref, grads_ref = run_with_grads(ref, x.double(), eq1_reference, g.double())
    r, taps = layer._sketch_rank(), kernel[0] * kernel[1]
    positions = 3 * y.shape[2] * y.shape[3]
    assert_close(y, y_ref, torch.float32, reduction=r * c * taps)
    assert_close(dx, dx_ref, torch.float32, reduction=r * o * taps)
    assert set(grads) == set(grads_ref) == {"bias"} | {n for n in ("s1", "s2") if getattr(layer, n) is not None}
    for name in grads:
        assert_close(grads[name], grads_ref[name], torch.float32, reduction=positions * max(o, c * taps), msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_linear_chain_equals_eq4_forward_and_every_gradient(mode, distribution, lead):
    d_in, d_out = 19, 13
    layer = SketchLinear(d_in, d_out, config=SketchConfig(k=5, pairs=3, mode=mode, distribution=distribution))
    ref = copy.deepcopy(layer).double()
    x = torch.randn(*lead, d_in)
    g = torch.randn(*lead, d_out)
    y, dx, grads = run_with_grads(layer, x, lambda m, t: m(t), g)
    flat = lambda m, t: eq4_reference(m, t.reshape(-1, d_in)).reshape(*lead, d_out)  # noqa: E731
    y_ref, dx_ref, grads_ref = run_with_grads(ref, x.double(), flat, g.double())
    assert_close(y, y_ref, torch.float32, reduction=d_in * 30)
    assert_close(dx, dx_ref, torch.float32, reduction=d_out * 30)
    reduction = math.prod(lead) * max(d_in, d_out)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], torch.float32, reduction=reduction, msg=name)


def test_gradients_equal_the_closed_forms_of_sec_3_1():
    """dL/d mat_4(S1_i) = I_in^T G U1_i^T / (2l), dL/d mat_4(S2_i) = U2_i I_in^T G / (2l) and
    dL/d I_in = sum_i G U1_i^T mat_4(S1_i)^T / (2l) + G mat_4(S2_i)^T U2_i / (2l), with I_in the im2col matrix
    (rows: output positions of all samples) and G the output gradient as (positions x d1)."""
    c, o, ksz, pairs, k = 4, 6, 3, 2, 3
    layer = SketchConv2d(c, o, ksz, padding=1, config=SketchConfig(mode="both", k=k, pairs=pairs), dtype=torch.float64)
    x = torch.randn(2, c, 5, 6, dtype=torch.float64)
    g = torch.randn(2, o, 5, 6, dtype=torch.float64)
    i_in = F.unfold(x, ksz, padding=1).transpose(1, 2).reshape(-1, c * ksz * ksz)  # (N h2 w2, d2 h w)
    gm = g.flatten(2).transpose(1, 2).reshape(-1, o)  # (N h2 w2, d1)
    x_leaf = x.clone().requires_grad_()
    layer(x_leaf).backward(g)
    two_l = 2 * pairs
    for i in range(pairs):
        # s1[i] holds mat_4(S1_i)^T (k, d2 h w) and s2[i] holds mat_4(S2_i)^T (d1, k h w)
        torch.testing.assert_close(layer.s1.grad[i].reshape(k, -1).t(), i_in.T @ gm @ layer.u1[i].T / two_l)
        torch.testing.assert_close(layer.s2.grad[i].t(), layer.u2[i] @ i_in.T @ gm / two_l)
    d_iin = sum(gm @ layer.u1[i].T @ layer.s1[i].detach().reshape(k, -1) / two_l
                + gm @ layer.s2[i].detach() @ layer.u2[i] / two_l for i in range(pairs))
    dx = F.fold(d_iin.reshape(2, 30, -1).transpose(1, 2), (5, 6), ksz, padding=1)  # im2col adjoint
    torch.testing.assert_close(x_leaf.grad, dx)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 2, 3)))


def test_gradcheck_float64():
    conv = SketchConv2d(3, 4, (3, 2), stride=(2, 1), padding=1, config=SketchConfig(mode="both", k=2, pairs=2),
                        dtype=torch.float64)
    lin = SketchLinear(5, 4, config=SketchConfig(mode="both", k=2, pairs=2, distribution="uniform"),
                       dtype=torch.float64)
    inputs = (torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    for layer, x in zip((conv, lin), inputs):
        names = [n for n, _ in layer.named_parameters()]
        leaves = [x.requires_grad_()] + [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

        def fn(x, *params, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

        assert torch.autograd.gradcheck(fn, leaves)


def variance_bound(mode: str, pairs: int, k: int, taps: int, d1: int, w_flat, m, y_nobias) -> float:
    """E||y^ - y||_F^2 per seed. "both": Theorem 3.1 / 3.2, d1 ||I_in * K||^2 / (l k) + ||I_in||^2 ||K||^2 / (l k h w)
    (taps = h w = 1 for SK-FC). One mode: Proposition 2.1.2 averaged over l independent pairs,
    2 d1 ||WM||^2 / (l k) (output side) or 2 ||W||^2 ||M||^2 / (l k h w) (input side; U2 has k h w rows).
    ``m`` is the im2col matrix of the whole batch (or the batch of input vectors)."""
    out_term = d1 * float(y_nobias.square().sum()) / (pairs * k)
    in_term = float(w_flat.square().sum() * m.square().sum()) / (pairs * k * taps)
    return {"both": out_term + in_term, "output": 2 * out_term, "input": 2 * in_term}[mode]


UNBIASED_CASES = [(mode, dist) for mode in MODES for dist in DISTRIBUTIONS]


@pytest.mark.parametrize("mode, distribution", UNBIASED_CASES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_from_dense_is_an_unbiased_estimator(kind, mode, distribution):
    """Theorems 3.1 / 3.2 over n = 300 fixed seeds, in float64.

    Unbiasedness: the seeds are independent, so the mean output's squared error has expectation <= bound / n;
    by Markov's inequality it exceeds 20 * bound / n with probability <= 1/20 (it measures 0.2-0.5 * bound / n
    here). Variance bound: the mean over seeds of the per-seed squared error (E <= bound) stays below the bound
    (it measures ~0.5 bound with one mode, ~0.25 with two, where the theorem is loose by 2). Randomness: that
    mean is above bound / 20, so a single sketch is far from exact and only the average converges."""
    n, k, pairs = 300, 3, 2
    if kind == "conv":
        dense = nn.Conv2d(5, 7, 3, padding=1).double()
        x = torch.randn(2, 5, 6, 5, dtype=torch.float64)
        m, taps, convert = F.unfold(x, 3, padding=1), 9, SketchConv2d.from_dense
        y_nobias = F.conv2d(x, dense.weight.detach(), None, padding=1)
    else:
        dense = nn.Linear(17, 9).double()
        x = torch.randn(4, 17, dtype=torch.float64)
        m, taps, convert = x, 1, SketchLinear.from_dense
        y_nobias = x @ dense.weight.detach().T
    with torch.no_grad():
        y = dense(x)
        outs = torch.stack([convert(dense, SketchConfig(k=k, pairs=pairs, mode=mode, distribution=distribution,
                                                         seed=s))(x) for s in range(n)])
    bound = variance_bound(mode, pairs, k, taps, y.shape[1], dense.weight.detach().flatten(1), m, y_nobias)
    per_seed = (outs - y).flatten(1).square().sum(1)
    mean_err = float((outs.mean(0) - y).square().sum())
    assert mean_err <= 20 * bound / n, (mean_err, bound / n)
    assert bound / 20 <= float(per_seed.mean()) <= bound, (float(per_seed.mean()), bound)
    assert float(per_seed.min()) > 10 * mean_err


@pytest.mark.parametrize("mode", MODES)
def test_parameter_counts_and_macs(mode):
    c, o, (kh, kw), k, pairs = 13, 22, (3, 5), 4, 3
    cfg = SketchConfig(k=k, pairs=pairs, mode=mode)
    layer = SketchConv2d(c, o, (kh, kw), padding=1, config=cfg)
    s1 = pairs * kh * kw * k * c  # S1_i in R^{d2 x h x w x k}
    s2 = pairs * k * kh * kw * o  # S2_i in R^{k x h x w x d1}
    expected = {"output": s1, "input": s2, "both": pairs * kh * kw * k * (o + c)}[mode]
    assert sketch_weight_params(o, (c, kh, kw), cfg) == expected
    assert layer.param_count() == expected + o == sum(p.numel() for p in layer.parameters())
    r = {"output": pairs * k, "input": pairs * k * kh * kw, "both": pairs * k * (1 + kh * kw)}[mode]
    assert layer.factors()[0].shape == (r, c, kh, kw) and layer.factors()[1].shape == (o, r)
    assert layer.macs(4, 6) == (r * c * kh * kw + o * r) * 24 and layer.dense_macs(4, 6) == o * c * kh * kw * 24
    lin = SketchLinear(40, 30, bias=False, config=cfg)
    assert lin.param_count() == {"output": pairs * k * 40, "input": pairs * k * 30, "both": pairs * k * 70}[mode]
    assert lin.macs() == lin._sketch_rank() * 70 and lin.dense_macs() == 1200


def test_random_matrices_distribution_and_buffers():
    """Def. 1: entries +-1/sqrt(rows); uniform: |u| <= sqrt(3/rows) with E[u^2] = 1/rows. Fixed, seeded, saved."""
    layer = SketchConv2d(6, 40, 3, config=SketchConfig(mode="both", k=8, pairs=2, distribution="sign"), seed=7)
    assert torch.equal(layer.u1.abs(), torch.full_like(layer.u1, 1 / math.sqrt(8)))
    assert torch.equal(layer.u2.abs(), torch.full_like(layer.u2, 1 / math.sqrt(8 * 9)))
    assert 0.4 < float((layer.u1 > 0).double().mean()) < 0.6
    assert not layer.u1.requires_grad and {"u1", "u2", "s1", "s2", "bias", "_extra_state"} == set(layer.state_dict())
    uni = SketchConv2d(6, 40, 3, config=SketchConfig(mode="both", k=8, pairs=2, distribution="uniform"), seed=7)
    for u, rows in ((uni.u1, 8), (uni.u2, 72)):
        assert float(u.abs().max()) <= math.sqrt(3 / rows)
        n = u.numel()  # E[u^2] = 1/rows with std sqrt(4/5)/rows / sqrt(n) for the mean of u^2
        assert abs(float(u.double().square().mean()) * rows - 1) < 5 * math.sqrt(0.8 / n)
    again = SketchConv2d(6, 40, 3, config=SketchConfig(mode="both", k=8, pairs=2, distribution="sign"), seed=7)
    assert torch.equal(again.u1, layer.u1) and torch.equal(again.u2, layer.u2)
    output_only = SketchConv2d(6, 40, 3, config=SketchConfig(mode="output"))
    assert output_only.s2 is None and output_only.u2 is None and "u2" not in output_only.state_dict()


def test_default_init_matches_dense_layer_scale():
    """Var of each reconstructed weight entry = 1/(3 fan_in), nn.Conv2d's default (kaiming_uniform, a=sqrt(5))."""
    for mode in MODES:
        layer = SketchConv2d(32, 48, 3, config=SketchConfig(k=8, pairs=2, mode=mode))
        dense = nn.Conv2d(32, 48, 3)
        ratio = float(layer.reconstructed_weight().detach().std() / dense.weight.detach().std())
        assert 0.85 < ratio < 1.15, (mode, ratio)
        assert float(layer.bias.detach().abs().max()) <= 1 / math.sqrt(32 * 9)
    lin = SketchLinear(300, 200, config=SketchConfig(mode="both", k=10, pairs=3))
    ratio = float(lin.reconstructed_weight().detach().std() / nn.Linear(300, 200).weight.detach().std())
    assert 0.9 < ratio < 1.1


def test_from_dense_geometry_to_dense_and_errors():
    conv = nn.Conv2d(4, 6, 3, padding="same", bias=False)
    layer = SketchConv2d.from_dense(conv, SketchConfig(mode="both", k=2), name="blk.conv")
    assert layer.padding == (1, 1) and layer.bias is None and layer._name == "blk.conv"
    x = torch.randn(2, 4, 7, 5)
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d and dense.weight is not conv.weight
    torch.testing.assert_close(dense.weight, layer.reconstructed_weight().detach())
    assert_close(dense(x), layer(x).detach(), reduction=200)
    assert torch.equal(layer.weight, layer.reconstructed_weight())
    with pytest.raises(ValueError, match=r"SketchConv2d.from_dense\(g\): cannot convert: groups=2"):
        SketchConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2), name="g")
    with pytest.raises(TypeError, match="SketchConfig"):
        SketchConv2d(3, 4, 3, config="sketch")
    with pytest.raises(ValueError, match="subclass"):
        SketchLinear.from_dense(nn.MultiheadAttention(8, 2).out_proj)
    lin = nn.Linear(9, 5)
    sk = SketchLinear.from_dense(lin, SketchConfig(k=2, mode="input"))
    assert sk.bias is lin.bias
    biased = nn.Conv2d(4, 6, 3).double()
    from_biased = SketchConv2d.from_dense(biased)
    assert from_biased.bias is biased.bias and from_biased.u1.dtype == from_biased.s1.dtype == torch.float64
    h = torch.randn(3, 9)
    assert_close(sk.to_dense()(h).detach(), sk(h).detach(), reduction=60)


def test_empty_batch_unbatched_and_float64():
    layer = SketchConv2d(3, 5, 3, padding=1, config=SketchConfig(mode="both", k=2))
    assert layer(torch.randn(0, 3, 7, 6)).shape == (0, 5, 7, 6)
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0))[0])
    lin = SketchLinear(6, 4, config=SketchConfig(mode="both", k=2))
    assert lin(torch.randn(0, 6)).shape == (0, 4) and lin(torch.randn(6)).shape == (4,)
    for m, shape in ((layer, (2, 3, 6, 6)), (lin, (2, 6))):
        m64 = copy.deepcopy(m).to(torch.float64)
        assert all(t.dtype == torch.float64 for t in m64.state_dict().values() if isinstance(t, torch.Tensor))
        x64 = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(m64(x64), m(x64.float()).double(), rtol=1e-5, atol=1e-5)


def model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 48, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.fc = nn.Sequential(nn.Linear(192, 64), nn.ReLU())
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.fc(self.body(torch.relu(self.stem(x)))))

    return Net()


CFG = SketchConfig(k=4, pairs=1, mode="both", seed=2)


def test_patch_nested_model_first_conv_and_small_head_stay_dense():
    net = model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tritonslide.patch(net, SketchConfig(mode="both"))
    # default k=16, both modes: the head's sketch has 16 * (64 + 10) + 10 = 1194 parameters, the head 650
    assert len(record) == 1 and "1 layer(s) left dense: head (sketch has 1194 >= 650 dense parameters)" in str(
        record[0].message)
    assert type(net.stem) is nn.Conv2d and type(net.head) is nn.Linear
    assert isinstance(net.body[0], SketchConv2d) and isinstance(net.fc[0], SketchLinear)
    assert net.body[2]._name == "body.2" and net(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    net2 = tritonslide.patch(model(), CFG)
    assert isinstance(net2.head, SketchLinear)  # k=4: 4*74+10 = 306 < 650
    before = dict(net2.named_modules())
    state = {k: v.clone() for k, v in net2.state_dict().items() if isinstance(v, torch.Tensor)}
    tritonslide.patch(net2, CFG)
    assert dict(net2.named_modules()) == before
    assert all(torch.equal(v, net2.state_dict()[k]) for k, v in state.items())


def test_unpatch_gives_dense_layers_with_reconstructed_weights():
    net = tritonslide.patch(model(), CFG)
    x = torch.randn(3, 3, 8, 8)
    y = net(x)
    recon = net.body[0].reconstructed_weight().detach()
    bias = net.fc[0].bias
    tritonslide.unpatch(net)
    assert not any(isinstance(m, (SketchConv2d, SketchLinear)) for m in net.modules())
    assert type(net.body[0]) is nn.Conv2d and type(net.fc[0]) is nn.Linear and net.fc[0].bias is bias
    torch.testing.assert_close(net.body[0].weight.detach(), recon)
    torch.testing.assert_close(net(x), y, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_and_config_mismatch():
    torch.manual_seed(5)
    net = tritonslide.patch(model(), CFG)
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    net(torch.randn(4, 3, 8, 8)).square().sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    fresh = tritonslide.patch(model(), CFG)
    assert not torch.equal(fresh.body[0].s1, net.body[0].s1)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(net.eval()(x), fresh.eval()(x))
    other = tritonslide.patch(model(), SketchConfig(k=4, pairs=1, mode="both", seed=3))
    with pytest.raises(ValueError, match=r"SketchConv2d 'body.0'.*saved with config.*'seed': 2"):
        other.load_state_dict(net.state_dict(), strict=False)
    with pytest.raises((ValueError, RuntimeError)):
        tritonslide.patch(model(), SketchConfig(mode="both", k=5, seed=2)).load_state_dict(net.state_dict())


def test_optimizer_step_trains_sketches_only():
    net = tritonslide.patch(model(), CFG)
    trainable = {n for n, p in net.named_parameters()}
    assert "body.0.s1" in trainable and "body.0.u1" not in trainable and "body.0.weight" not in trainable
    u = net.body[0].u2.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert net.body[0].s2.grad is not None and net.body[0].s2.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(net.body[0].u2, u)


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.randn(2, 3, 7), ValueError, r"shape \(N, 32, H, W\)"),
        (torch.randn(2, 5, 7, 7), ValueError, r"expected 32 input channels"),
        (torch.randn(2, 32, 7, 7, dtype=torch.float64), TypeError, "expected a torch.float32 input"),
        (torch.randn(2, 32, 0, 7), ValueError, "smaller than the kernel extent"),
        (torch.randn(2, 32, 7, 7, device="meta"), ValueError, "input is on meta"),
        ("x", TypeError, "expected a torch.Tensor"),
    ],
)
def test_bad_conv_input_names_the_layer(x, exc, match):
    net = tritonslide.patch(model(), CFG)
    with pytest.raises(exc, match=match) as info:
        net.body[0](x)
    assert "SketchConv2d 'body.0'" in str(info.value)


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.randn(2, 81), ValueError, r"shape \(\.\.\., 192\)"),
        (torch.tensor(1.0), ValueError, r"shape \(\.\.\., 192\)"),
        (torch.randn(2, 192, dtype=torch.float64), TypeError, "torch.float32"),
        (torch.randn(2, 192, device="meta"), ValueError, "input is on meta"),
    ],
)
def test_bad_linear_input_names_the_layer(x, exc, match):
    net = tritonslide.patch(model(), CFG)
    with pytest.raises(exc, match=match) as info:
        net.fc[0](x)
    assert "SketchLinear 'fc.0'" in str(info.value)


def test_unconvertible_layers_listed():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.ConvTranspose2d(8, 8, 3),
                        nn.Conv2d(8, 32, 3), nn.Flatten(), nn.LazyLinear(30))
    with pytest.warns(UserWarning) as record:
        tritonslide.patch(net, SketchConfig(mode="both", k=2))
    msg = str(record[0].message)
    assert "groups=2" in msg and "transposed" in msg and "uninitialized lazy module" in msg
    assert isinstance(net[3], SketchConv2d) and type(net[1]) is nn.Conv2d
