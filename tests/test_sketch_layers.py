"""SketchConv2d / SketchLinear against eq. 1 and eq. 4 of Kasiviswanathan et al. (shared/papers/004) written out.

The references form every kernel of eq. 1 from the definitions (the mode-4 product ``S1_i x_4 U1_i^T`` and the
``S2_i (.) U2_i^T`` sum, in the paper's (d2, h, w, d1) layout) and loop over the l pairs; gradients come from
autograd through them and, separately, from the closed forms of sec. 3.1. The layer's ``U1_i`` / ``U2_i`` are the
blocks of an orthonormal basis of the stacked random matrices' row space and the scale is ``g = 1 / sqrt(m)``
(``m`` modes), not the paper's raw matrices and ``1 / (m l)``; the tests of the basis compare it with the raw
matrices, and the initializations ("fit", "unbiased", "scratch") are checked against independent solutions.
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


def modes_scale(layer) -> float:
    """g = 1/sqrt(m), m = the number of sides present (1 for "output" / "input", 2 for "both")."""
    return 1 / math.sqrt((layer.s1 is not None) + (layer.s2 is not None))


def paper_kernels(layer, s1, s2):
    """Per pair i, K1_i = S1_i x_4 U1_i^T and K2_i = S2_i (.) U2_i^T as (d2, h, w, d1) tensors, from Def. 2 and the
    definition under eq. 1: (S2 (.) U2^T)_{xyzs} = sum_{c,i,j} S2_{cijs} U2_{(cij)(xyz)}. ``s1``, ``s2``: the
    layer's Parameters or stand-ins of their shapes. Storage: s1[i] (k, d2 h w) holds mat_4(S1_i)^T, s2[i]
    (d1, k h w) holds mat_4(S2_i)^T; U1_i = u1[i] (k x d1) and U2_i = u2[i] ((k h w) x (d2 h w)) are the layer's
    basis buffers: block i of the orthonormal basis of the row space of the stacked random matrices (l k x d1,
    resp. l k h w x d2 h w). SK-FC is the case h = w = 1."""
    cfg = layer.sketch_config
    c, kh, kw = (*layer.fan_in_shape, 1, 1)[:3]
    o = layer._out
    k1, k2 = [], []
    for i in range(cfg.pairs):
        if s1 is not None:
            s1_i = s1[i].reshape(cfg.k, c, kh, kw).permute(1, 2, 3, 0)  # (d2, h, w, k)
            k1.append(torch.einsum("xyzc,cs->xyzs", s1_i, layer.u1[i]))
        if s2 is not None:
            s2_i = s2[i].t().reshape(cfg.k, kh, kw, o)  # (k, h, w, d1)
            u2 = layer.u2[i].reshape(cfg.k, kh, kw, c, kh, kw)
            k2.append(torch.einsum("cijs,cijxyz->xyzs", s2_i, u2))
    return k1, k2


def reference_weight(layer, s1, s2):
    """The weight eq. 1 sums, g sum_i K1_i + K2_i, as an (O, d2 h w) matrix (PyTorch's W.flatten(1))."""
    k1, k2 = paper_kernels(layer, s1, s2)
    return modes_scale(layer) * sum(k.permute(3, 0, 1, 2).reshape(layer._out, -1) for k in k1 + k2)


def eq1_reference(layer, x):
    """Eq. 1 with the layer's scale: g sum_i I_in * K1_i + I_in * K2_i, g = 1/sqrt(m) (the paper has 1/(m l) with
    its raw matrices), plus the bias; one dense F.conv2d per kernel."""
    k1, k2 = paper_kernels(layer, layer.s1, layer.s2)
    scale = modes_scale(layer)
    y = 0
    for kernel in k1 + k2:
        y = y + scale * F.conv2d(x, kernel.permute(3, 0, 1, 2), None, layer.stride, layer.padding, layer.dilation)
    return y + (layer.bias.view(1, -1, 1, 1) if layer.bias is not None else 0)


def eq4_reference(layer, h):
    """Eq. 4 with explicit matrices and the layer's scale: g sum_i U1_i^T S1_i h + S2_i U2_i h + b, one pair at a
    time (U1_i, U2_i: blocks of the orthonormal bases, g = 1/sqrt(m))."""
    cfg = layer.sketch_config
    terms = []
    for i in range(cfg.pairs):
        if layer.s1 is not None:
            terms.append(layer.u1[i].t() @ layer.s1[i] @ h.T)
        if layer.s2 is not None:
            terms.append(layer.s2[i] @ layer.u2[i] @ h.T)
    out = modes_scale(layer) * sum(terms)
    return out.T + (layer.bias if layer.bias is not None else 0)


def row_space_projection(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection (D x D) on the row space of an (R, D) matrix, pinv(M) M."""
    return torch.linalg.pinv(m) @ m


def raw_projections(layer):
    """(P1, P2): projections on the row spaces of the RAW stacked U1 (l k x d1) and U2 (l k h w x d2 h w), None for
    a missing side. Independent of the layer's basis buffers."""
    raw1, raw2 = layer._raw_matrices()
    p1 = row_space_projection(raw1.flatten(0, 1)) if raw1 is not None else None
    p2 = row_space_projection(raw2.flatten(0, 1)) if raw2 is not None else None
    return p1, p2


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
    """Sec. 3.1 in the layer's basis and scale (U1_i, U2_i the blocks of the orthonormal bases of the stacked
    random matrices' row spaces, g = 1/sqrt(m) = 1/sqrt(2) here): dL/d mat_4(S1_i) = g I_in^T G U1_i^T,
    dL/d mat_4(S2_i) = g U2_i I_in^T G and dL/d I_in = g sum_i G U1_i^T mat_4(S1_i)^T + G mat_4(S2_i)^T U2_i, with
    I_in the im2col matrix (rows: output positions of all samples) and G the output gradient as (positions x d1)."""
    c, o, ksz, pairs, k = 4, 7, 3, 2, 3
    layer = SketchConv2d(c, o, ksz, padding=1, config=SketchConfig(mode="both", k=k, pairs=pairs), dtype=torch.float64)
    x = torch.randn(2, c, 5, 6, dtype=torch.float64)
    g = torch.randn(2, o, 5, 6, dtype=torch.float64)
    i_in = F.unfold(x, ksz, padding=1).transpose(1, 2).reshape(-1, c * ksz * ksz)  # (N h2 w2, d2 h w)
    gm = g.flatten(2).transpose(1, 2).reshape(-1, o)  # (N h2 w2, d1)
    x_leaf = x.clone().requires_grad_()
    layer(x_leaf).backward(g)
    scale = 1 / math.sqrt(2)
    for i in range(pairs):
        # s1[i] holds mat_4(S1_i)^T (k, d2 h w) and s2[i] holds mat_4(S2_i)^T (d1, k h w)
        torch.testing.assert_close(layer.s1.grad[i].t(), scale * i_in.T @ gm @ layer.u1[i].T)
        torch.testing.assert_close(layer.s2.grad[i].t(), scale * layer.u2[i] @ i_in.T @ gm)
    d_iin = sum(scale * (gm @ layer.u1[i].T @ layer.s1[i].detach() + gm @ layer.s2[i].detach() @ layer.u2[i])
                for i in range(pairs))
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
    """Theorems 3.1 / 3.2 over n = 300 fixed seeds, in float64, for ``init="unbiased"``: the layer computes the
    paper's estimator built from the RAW random matrices (scale 1/(m l)), represented in its basis (checked exactly
    in test_unbiased_init_is_the_papers_estimator); the bounds are the theorems'.

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
                                                         seed=s, init="unbiased"))(x) for s in range(n)])
    bound = variance_bound(mode, pairs, k, taps, y.shape[1], dense.weight.detach().flatten(1), m, y_nobias)
    per_seed = (outs - y).flatten(1).square().sum(1)
    mean_err = float((outs.mean(0) - y).square().sum())
    assert mean_err <= 20 * bound / n, (mean_err, bound / n)
    assert bound / 20 <= float(per_seed.mean()) <= bound, (float(per_seed.mean()), bound)
    assert float(per_seed.min()) > 10 * mean_err


def dense_layer(kind: str) -> tuple[nn.Module, callable]:
    """A float64 dense layer and its converter. With k = 2, l = 2 neither side spans everything (l k = 4 < O,
    l k h w = 24 < C h w = 42 for the conv, 4 < 13 and 4 < 19 for the linear), so no mode is exact."""
    if kind == "conv":
        return nn.Conv2d(7, 11, (3, 2), padding=1).double(), SketchConv2d.from_dense
    return nn.Linear(19, 13).double(), SketchLinear.from_dense


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fit_init_is_the_least_squares_solution(kind, mode):
    """init="fit" (and "auto" in from_dense): the Parameters minimize ||W - W^(S1, S2)||_F. Checked against
    torch.linalg.lstsq on the explicit linear map from the Parameters to the weight (the Jacobian of
    reference_weight, eq. 1's kernels written out), the normal equations, and the closed forms of the residual
    with the projections P1, P2 on the RAW stacked matrices' row spaces: (I - P1) W (output side), W (I - P2)
    (input side), (I - P1) W (I - P2) (both). A projection: ||W||^2 = ||W^||^2 + ||W - W^||^2, so the error is
    below ||W||."""
    dense, convert = dense_layer(kind)
    cfg = SketchConfig(k=2, pairs=2, mode=mode, distribution="uniform", seed=1, init="fit")
    layer = convert(dense, cfg, name="fit")
    assert layer.bias is dense.bias
    w = dense.weight.detach().flatten(1)
    fitted = layer.reconstructed_weight().detach().flatten(1)
    names = [n for n in ("s1", "s2") if getattr(layer, n) is not None]
    params = tuple(getattr(layer, n).detach() for n in names)

    def weight_of(*ps):
        given = dict(zip(names, ps))
        return reference_weight(layer, given.get("s1"), given.get("s2")).flatten()

    jac = torch.autograd.functional.jacobian(weight_of, params, vectorize=True)
    a = torch.cat([j.flatten(1) for j in jac], 1)  # (O F, number of sketch entries)
    torch.testing.assert_close(a @ torch.cat([p.flatten() for p in params]), fitted.flatten())
    sol = torch.linalg.lstsq(a, w.flatten().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    torch.testing.assert_close(fitted, (a @ sol).view_as(w))
    torch.testing.assert_close(a.T @ (w - fitted).flatten(), torch.zeros(a.shape[1], dtype=torch.float64))
    if mode != "both":  # one side: the map is injective (l k <= O, l k h w <= F), so the Parameters are unique
        torch.testing.assert_close(params[0].flatten(), sol)
    p1, p2 = raw_projections(layer)
    out_rest = w - p1 @ w if p1 is not None else w
    residual = out_rest - out_rest @ p2 if p2 is not None else out_rest
    torch.testing.assert_close(w - fitted, residual)
    err = float((w - fitted).norm())
    assert 0 < err < float(w.norm())
    assert math.isclose(float(w.square().sum()), float(fitted.square().sum()) + err**2, rel_tol=1e-10)
    auto = convert(dense, SketchConfig(k=2, pairs=2, mode=mode, distribution="uniform", seed=1), name="fit")
    assert all(torch.equal(getattr(auto, n), getattr(layer, n)) for n in names)


def test_fit_output_error_of_a_64_to_128_conv_is_below_one():
    """The issue's example, a 64 -> 128 3x3 conv at the default config (k = 16, one pair, output side): the fit
    keeps the projection of each output on a random 16-dimensional subspace, a relative output error of about
    sqrt(1 - 16/128) = 0.94 (measured 0.937); the paper's estimator (init="unbiased", the old default) has about
    sqrt(d1 / (l k)) = 2.8 (measured 2.74 here, 2.65 in the issue)."""
    dense = nn.Conv2d(64, 128, 3, padding=1)
    x = torch.randn(2, 64, 10, 9)
    rel = {}
    with torch.no_grad():
        y = dense(x)
        for init in ("default", "fit", "unbiased"):
            layer = SketchConv2d.from_dense(dense, None if init == "default" else SketchConfig(init=init))
            rel[init] = float((layer(x) - y).norm() / y.norm())
    assert rel["default"] == rel["fit"] < 1, rel
    assert rel["unbiased"] > 2, rel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_unbiased_init_is_the_papers_estimator(kind, mode):
    """init="unbiased": W^ = 1/(m l) sum_i U1_i^T U1_i W + W U2_i^T U2_i with the RAW random matrices (the
    estimator of Theorems 3.1 / 3.2, S1_i = U1_i W and S2_i = W U2_i^T), represented exactly in the layer's
    basis."""
    dense, convert = dense_layer(kind)
    layer = convert(dense, SketchConfig(k=2, pairs=2, mode=mode, init="unbiased"))
    raw1, raw2 = layer._raw_matrices()
    w = dense.weight.detach().flatten(1)
    terms = []
    for i in range(2):
        if raw1 is not None:
            terms.append(raw1[i].T @ raw1[i] @ w)
        if raw2 is not None:
            terms.append(w @ raw2[i].T @ raw2[i])
    torch.testing.assert_close(layer.reconstructed_weight().detach().flatten(1), sum(terms) / len(terms))
    assert layer.bias is dense.bias


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_scratch_init_has_the_dense_norm_and_keeps_the_bias(kind, mode):
    """init="scratch": reset_parameters' random draws (global RNG) rescaled so that the reconstructed weight has the
    dense weight's Frobenius norm (the dense layer's own init scale, 2.5x nn's default here); W itself is ignored,
    and the dense bias Parameter is kept, values and all."""
    dense = (nn.Conv2d(12, 20, 3) if kind == "conv" else nn.Linear(40, 30)).float()
    convert = SketchConv2d.from_dense if kind == "conv" else SketchLinear.from_dense
    with torch.no_grad():
        dense.weight.mul_(2.5)
    bias = dense.bias.detach().clone()
    cfg = SketchConfig(k=3, pairs=2, mode=mode, init="scratch")
    torch.manual_seed(11)
    layer = convert(dense, cfg)
    assert layer.bias is dense.bias and torch.equal(layer.bias.detach(), bias)
    ratio = float(layer.reconstructed_weight().detach().double().norm() / dense.weight.detach().double().norm())
    assert abs(ratio - 1) < 1e-6, ratio
    other = copy.deepcopy(dense)
    with torch.no_grad():
        other.weight.copy_(-dense.weight.flip(0))  # another weight of the same norm
    torch.manual_seed(11)
    same = convert(other, cfg)
    names = [n for n in ("s1", "s2") if getattr(layer, n) is not None]
    assert all(torch.equal(getattr(same, n), getattr(layer, n)) for n in names)
    torch.manual_seed(12)  # the draws come from the global RNG
    assert not torch.equal(getattr(convert(dense, cfg), names[0]), getattr(layer, names[0]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_sgd_step_moves_the_weight_by_the_projected_dense_step(kind, mode):
    """The effective learning rate: one plain SGD step (lr eta, no momentum) on the sketch Parameters moves the
    reconstructed weight by exactly -eta g^2 (P1 G + G P2), with G = dL/dW of a dense layer holding the
    reconstructed weight, P1, P2 the projections on the RAW matrices' row spaces and g^2 = 1/m: never more than
    the dense step, ||dW|| <= eta ||G||. (The paper's raw scaled signs would give -eta/(m l)^2 (U1^T U1 G +
    G U2^T U2), whose U1^T U1 has eigenvalues near d1 / k.)"""
    eta = 0.3
    cfg = SketchConfig(k=2, pairs=2, mode=mode, distribution="sign", seed=5)
    if kind == "conv":
        layer = SketchConv2d(7, 11, (3, 2), stride=(1, 2), padding=1, config=cfg, dtype=torch.float64)
        x = torch.randn(3, 7, 8, 9, dtype=torch.float64)

        def dense_fn(w, b):
            return F.conv2d(x, w, b, layer.stride, layer.padding)
    else:
        layer = SketchLinear(19, 13, config=cfg, dtype=torch.float64)
        x = torch.randn(5, 19, dtype=torch.float64)

        def dense_fn(w, b):
            return F.linear(x, w, b)
    with torch.no_grad():
        target = torch.randn_like(layer(x))
    w0 = layer.reconstructed_weight().detach()
    w_dense = w0.clone().requires_grad_()
    (dense_fn(w_dense, layer.bias.detach()) - target).square().sum().backward()
    grad = w_dense.grad.flatten(1)
    opt = torch.optim.SGD(layer.parameters(), lr=eta)
    (layer(x) - target).square().sum().backward()
    opt.step()
    step = (layer.reconstructed_weight().detach() - w0).flatten(1)
    p1, p2 = raw_projections(layer)
    g2 = 1 / ((p1 is not None) + (p2 is not None))
    expected = -eta * g2 * ((p1 @ grad if p1 is not None else 0) + (grad @ p2 if p2 is not None else 0))
    torch.testing.assert_close(step, expected)
    assert float(step.norm()) <= eta * float(grad.norm())


def test_channels_last_layer_and_input():
    """``layer.to(memory_format=torch.channels_last)`` leaves the (at most 3-d) Parameters and buffers as they are,
    and a channels_last input gives a channels_last output equal to the NCHW one, with the same gradients."""
    layer = SketchConv2d(7, 13, (3, 2), stride=(2, 1), padding=1, config=SketchConfig(k=3, pairs=2, mode="both"))
    x, g = torch.randn(2, 7, 9, 10), torch.randn(layer.output_shape(2, 9, 10))
    y, dx, grads = run_with_grads(layer, x, lambda m, t: m(t), g)
    before = {n: t.clone() for n, t in layer.state_dict().items() if isinstance(t, torch.Tensor)}
    assert layer.to(memory_format=torch.channels_last) is layer
    assert all(torch.equal(t, layer.state_dict()[n]) for n, t in before.items())
    cl = torch.channels_last
    y_cl, dx_cl, grads_cl = run_with_grads(layer, x.to(memory_format=cl), lambda m, t: m(t), g.to(memory_format=cl))
    assert y_cl.is_contiguous(memory_format=cl)
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
    assert_close(dx_cl, dx, torch.float32, reduction=layer._sketch_rank() * 13 * 6)
    positions = 2 * y.shape[2] * y.shape[3]
    for name in grads:
        assert_close(grads_cl[name], grads[name], torch.float32, reduction=positions * 13, msg=name)


@pytest.mark.parametrize("saved, loaded", [("fit", "scratch"), ("unbiased", "auto"), ("scratch", "fit")])
def test_state_dict_loads_across_inits(saved, loaded):
    """The saved config check ignores ``init`` (how a layer was first set, not what it computes): a state_dict
    from one init loads into a layer of another with the same other fields, and then computes the same; a
    different seed is still refused."""
    cfg = dict(k=3, pairs=2, mode="both", seed=4)
    src = SketchConv2d.from_dense(nn.Conv2d(7, 11, 3, padding=1), SketchConfig(**cfg, init=saved), name="blk")
    dst = SketchConv2d.from_dense(nn.Conv2d(7, 11, 3, padding=1), SketchConfig(**cfg, init=loaded), name="blk")
    x = torch.randn(2, 7, 6, 5)
    assert not torch.allclose(dst(x), src(x))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))
    other = SketchConv2d.from_dense(nn.Conv2d(7, 11, 3, padding=1), SketchConfig(**{**cfg, "seed": 5}), name="blk")
    with pytest.raises(ValueError, match=r"SketchConv2d 'blk'.*saved with config.*'seed': 4"):
        other.load_state_dict(src.state_dict())


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


def test_raw_random_matrices_distribution():
    """Def. 1: entries +-1/sqrt(rows); uniform: |u| <= sqrt(3/rows) with E[u^2] = 1/rows. U1_i is k x d1, U2_i is
    (k h w) x (d2 h w); float64, drawn again from the layer's seed."""
    layer = SketchConv2d(6, 40, 3, config=SketchConfig(mode="both", k=8, pairs=2, distribution="sign"), seed=7)
    raw1, raw2 = layer._raw_matrices()
    assert raw1.shape == (2, 8, 40) and raw2.shape == (2, 8 * 9, 6 * 9) and raw1.dtype == raw2.dtype == torch.float64
    assert torch.equal(raw1.abs(), torch.full_like(raw1, 1 / math.sqrt(8)))
    assert torch.equal(raw2.abs(), torch.full_like(raw2, 1 / math.sqrt(8 * 9)))
    assert 0.4 < float((raw1 > 0).double().mean()) < 0.6 and 0.45 < float((raw2 > 0).double().mean()) < 0.55
    again = layer._raw_matrices()
    assert torch.equal(again[0], raw1) and torch.equal(again[1], raw2)
    uni = SketchConv2d(6, 40, 3, config=SketchConfig(mode="both", k=8, pairs=2, distribution="uniform"), seed=7)
    for u, rows in zip(uni._raw_matrices(), (8, 72)):
        assert float(u.abs().max()) <= math.sqrt(3 / rows)
        n = u.numel()  # E[u^2] = 1/rows with std sqrt(4/5)/rows / sqrt(n) for the mean of u^2
        assert abs(float(u.square().mean()) * rows - 1) < 5 * math.sqrt(0.8 / n)
    assert uni._raw_matrices()[1] is not None and SketchConv2d(6, 40, 3)._raw_matrices()[1] is None


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """(M M^T)^(-1/2) M (rows <= cols) or M (M^T M)^(-1/2) (rows > cols), from an eigendecomposition."""
    rows, cols = m.shape
    gram = m @ m.T if rows <= cols else m.T @ m
    evals, evecs = torch.linalg.eigh(gram)
    inv_sqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return inv_sqrt @ m if rows <= cols else m @ inv_sqrt


# (C, O, kernel, k, pairs): U1 stacked l k x O and U2 stacked l k h w x C h w, wide (rows < cols) or tall
BASIS_CASES = [(20, 40, 3, 4, 2),  # U1 8 x 40, U2 72 x 180: both wide
               (6, 13, 3, 8, 2),  # U1 16 x 13, U2 144 x 54: both tall (rank = cols)
               (5, 30, (3, 2), 3, 3)]  # U1 9 x 30 wide, U2 54 x 30 tall


@pytest.mark.parametrize("case", BASIS_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_basis_buffers_are_orthonormal_bases_of_the_raw_row_spaces(case, distribution):
    """u1 / u2 stacked are the polar factors of the stacked raw matrices: orthonormal rows when rows <= cols
    (orthonormal columns otherwise), the same row space, seeded, saved in the state_dict and never trained."""
    c, o, kernel, k, pairs = case
    cfg = SketchConfig(mode="both", k=k, pairs=pairs, distribution=distribution)
    layer = SketchConv2d(c, o, kernel, config=cfg, seed=7, dtype=torch.float64)
    taps = math.prod(layer.kernel_size)
    assert layer.u1.shape == (pairs, k, o) and layer.u2.shape == (pairs, k * taps, c * taps)
    assert layer.s1.shape == (pairs, k, c * taps) and layer.s2.shape == (pairs, o, k * taps)
    for u, raw in zip((layer.u1, layer.u2), layer._raw_matrices()):
        u, raw = u.flatten(0, 1), raw.flatten(0, 1)
        rows, cols = u.shape
        gram = u @ u.T if rows <= cols else u.T @ u
        torch.testing.assert_close(gram, torch.eye(min(rows, cols), dtype=torch.float64))
        torch.testing.assert_close(u.T @ u, row_space_projection(raw))  # the same row space
        torch.testing.assert_close(u, polar_factor(raw))  # the orthonormal matrix closest to the raw one
    f32 = SketchConv2d(c, o, kernel, config=cfg, seed=7)
    assert torch.equal(f32.u1, layer.u1.float()) and torch.equal(f32.u2, layer.u2.float())  # seeded
    other = SketchConv2d(c, o, kernel, config=cfg, seed=8)
    assert not torch.equal(other.u1, f32.u1) and not torch.equal(other.u2, f32.u2)
    assert {"u1", "u2", "s1", "s2", "bias", "_extra_state"} == set(f32.state_dict())
    assert {n for n, _ in f32.named_parameters()} == {"s1", "s2", "bias"} and not f32.u1.requires_grad
    assert all(t.dim() <= 3 for t in f32.state_dict().values() if isinstance(t, torch.Tensor))
    output_only = SketchConv2d(6, 40, 3, config=SketchConfig(mode="output"))
    assert output_only.s2 is None and output_only.u2 is None and "u2" not in output_only.state_dict()
    input_only = SketchLinear(19, 13, config=SketchConfig(mode="input", k=5, pairs=3))
    assert input_only.s1 is None and input_only.u1 is None and input_only.u2.shape == (3, 5, 19)


@pytest.mark.parametrize(
    "c, o, k, pairs, mode",
    [(32, 48, 8, 2, "output"), (32, 48, 8, 2, "input"), (32, 48, 8, 2, "both"),
     (32, 12, 8, 2, "output"),  # l k = 16 > O: rank1 = O
     (6, 40, 8, 2, "input")],  # l k h w = 144 > C h w = 54: rank2 = 54
)
def test_default_init_matches_dense_layer_scale(c, o, k, pairs, mode):
    """E[W_ij^2] = 1/(3 fan_in), nn.Conv2d's default (kaiming_uniform, a=sqrt(5)), also where a basis has fewer
    rows than the l k (h w) random matrices (rank capped). ||W||^2 is a sum of n = rank1 F (output side) plus
    O rank2 (input side) squared U(-b, b) draws (relative variance 4/5 each) rotated by the orthonormal bases,
    so its mean has a relative std of sqrt(0.8 / n): bound at 5 sigma."""
    layer = SketchConv2d(c, o, 3, config=SketchConfig(k=k, pairs=pairs, mode=mode))
    fan_in = c * 9
    w = layer.reconstructed_weight().detach().double()
    n = (min(pairs * k, o) * fan_in if layer.s1 is not None else 0)
    n += (o * min(pairs * k * 9, fan_in) if layer.s2 is not None else 0)
    assert abs(float(w.square().mean()) * 3 * fan_in - 1) < 5 * math.sqrt(0.8 / n), float(w.square().mean())
    assert float(layer.bias.detach().abs().max()) <= 1 / math.sqrt(fan_in)
    lin = SketchLinear(300, 200, config=SketchConfig(mode=mode, k=10, pairs=3))
    ms = float(lin.reconstructed_weight().detach().double().square().mean())
    assert abs(ms * 3 * 300 - 1) < 0.1, ms  # n >= 30 * 200 draws: 5 sigma = 0.058


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
    dense_norms = {name: float(net.get_submodule(name).weight.detach().norm()) for name in ("body.0", "fc.0")}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tritonslide.patch(net, SketchConfig(mode="both"))
    # default k=16, both modes: the head's sketch has 16 * (64 + 10) + 10 = 1194 parameters, the head 650
    assert len(record) == 1 and "1 layer(s) left dense: head (sketch has 1194 >= 650 dense parameters)" in str(
        record[0].message)
    assert type(net.stem) is nn.Conv2d and type(net.head) is nn.Linear
    assert isinstance(net.body[0], SketchConv2d) and isinstance(net.fc[0], SketchLinear)
    assert net.body[2]._name == "body.2" and net(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    # a fresh model: init="auto" resolves to "scratch", recorded in the layers' configs; the dense norms are kept
    for name, norm in dense_norms.items():
        layer = net.get_submodule(name)
        assert layer.config.init == "scratch"
        assert abs(float(layer.reconstructed_weight().detach().double().norm()) / norm - 1) < 1e-6
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
    # a fit-initialized copy of another fresh model (net's layers were initialized "scratch": init is not checked)
    fresh = tritonslide.patch(model(), CFG, init="fit")
    assert net.body[0].config.init == "scratch" and fresh.body[0].config.init == "fit"
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
