"""CSGConv2d / SliceGenerator (shared/papers/003) against plain references: tile loops, numpy least squares."""

import copy
import dataclasses
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tests.tolerances import assert_close
from tritonslide.configs import CSGConfig
from tritonslide.nn import CSGConv2d, SliceGenerator, looks_untrained
from tritonslide.nn.csg import make_context

TINY = CSGConfig(slice_shape=(3, 2, 3, 3), code_size=5)


def reference_weight(codes, a, shape, slice_shape):
    """Plain loops over the tiles: tile t (row-major over the grid of ceil(dim / slice dim) tiles) is A codes[t],
    reshaped to the slice; the part inside the kernel is copied (footnote 4). ``codes``: (num_tiles, n_c)."""
    o, c, kh, kw = shape
    s0, s1, s2, s3 = slice_shape
    w = torch.zeros(shape, dtype=codes.dtype)
    t = 0
    for i in range(math.ceil(o / s0)):
        for j in range(math.ceil(c / s1)):
            for k in range(math.ceil(kh / s2)):
                for m in range(math.ceil(kw / s3)):
                    piece = (a @ codes[t]).reshape(slice_shape)
                    e0, e1 = min(s0, o - i * s0), min(s1, c - j * s1)
                    e2, e3 = min(s2, kh - k * s2), min(s3, kw - m * s3)
                    w[i * s0:i * s0 + e0, j * s1:j * s1 + e1, k * s2:k * s2 + e2, m * s3:m * s3 + e3] = (
                        piece[:e0, :e1, :e2, :e3]
                    )
                    t += 1
    assert t == codes.shape[0]
    return w


def tiles_of(w, slice_shape):
    """Plain loop: every tile of the (O, C, kh, kw) numpy kernel ``w``, cropped at the edges, row-major."""
    for idx in np.ndindex(*(math.ceil(n / s) for n, s in zip(w.shape, slice_shape))):
        yield idx, w[tuple(slice(i * s, (i + 1) * s) for i, s in zip(idx, slice_shape))]


def lstsq_error(weights, a, slice_shape):
    """sum over every tile of every kernel of min_c ||A_t c - w_t||^2, A_t the rows of A of the tile's entries that
    lie inside the kernel: numpy's lstsq tile by tile."""
    a = np.asarray(a, dtype=np.float64)
    n_c = a.shape[1]
    a = a.reshape(*slice_shape, n_c)
    total = 0.0
    for w in weights:
        for _, block in tiles_of(np.asarray(w, dtype=np.float64), slice_shape):
            a_t = a[tuple(slice(0, e) for e in block.shape)].reshape(-1, n_c)
            code = np.linalg.lstsq(a_t, block.reshape(-1), rcond=None)[0]
            total += float(np.square(a_t @ code - block.reshape(-1)).sum())
    return total


# (C, O, k, stride, padding, dilation, H, W, slice_shape, code_size): channel counts the slices do not divide,
# kernels larger and smaller than the slice's (partial slices in the kernel dims), the paper's default slice
GEOMETRIES = [
    (7, 13, 3, 1, 1, 1, 9, 8, (4, 3, 3, 3), 6),
    (6, 5, 5, 2, 2, 1, 11, 10, (2, 4, 3, 3), 7),
    (10, 9, 1, 1, 0, 1, 5, 7, (4, 4, 3, 3), 5),
    (20, 18, 3, 1, 2, 2, 9, 9, (16, 16, 3, 3), 128),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:8])))
def test_generated_weight_equals_tile_loop(geom):
    c, o, k, *_, slice_shape, n_c = geom
    layer = CSGConv2d(c, o, k, config=CSGConfig(slice_shape=slice_shape, code_size=n_c))
    grid = tuple(math.ceil(n / s) for n, s in zip((o, c, k, k), slice_shape))
    assert layer.grid == grid and layer.num_slices == math.prod(grid)
    assert layer.codes.shape == (math.prod(grid), n_c) and layer.codes.dim() == 2
    view = layer.codes_grid()
    assert view.shape == (*grid, n_c) and view.data_ptr() == layer.codes.data_ptr()  # a view, not a copy
    for t, idx in enumerate(np.ndindex(*grid)):  # row-major over the grid
        assert torch.equal(view[idx], layer.codes[t])
    ref = reference_weight(layer.codes.detach(), layer.generator.weight.detach(), (o, c, k, k), slice_shape)
    assert_close(layer.weight.detach(), ref, reduction=n_c)
    assert torch.equal(layer.to_dense().weight, layer.generated_weight().detach())


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:8])))
def test_forward_and_every_gradient_match_conv_on_the_explicit_weight(geom):
    c, o, k, s, p, d, h, w, slice_shape, n_c = geom
    layer = CSGConv2d(c, o, k, s, p, d, config=CSGConfig(slice_shape=slice_shape, code_size=n_c))
    x = torch.randn(3, c, h, w, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    codes = layer.codes.detach().clone().requires_grad_()
    a = layer.generator.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.conv2d(x_ref, reference_weight(codes, a, (o, c, k, k), slice_shape), bias, s, p, d)
    y_ref.backward(g)
    n_out = 3 * y.shape[2] * y.shape[3]
    assert_close(y, y_ref.detach(), reduction=c * k * k * n_c)
    assert_close(x.grad, x_ref.grad, reduction=o * k * k * n_c)
    assert_close(layer.bias.grad, bias.grad, reduction=n_out)
    assert_close(layer.codes.grad, codes.grad, reduction=n_out * math.prod(slice_shape))
    assert_close(layer.generator.weight.grad, a.grad, reduction=n_out * layer.num_slices)


def test_gradcheck_float64():
    layer = CSGConv2d(4, 5, 3, stride=(1, 2), padding=1, config=TINY, dtype=torch.float64)
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    assert set(params) == {"codes", "bias", "generator.weight"}

    def fn(x, codes, bias, a):
        return torch.func.functional_call(layer, {"codes": codes, "bias": bias, "generator.weight": a}, (x,))

    assert torch.autograd.gradcheck(fn, (x, params["codes"], params["bias"], params["generator.weight"]))


# ---------------------------------------------------------------------- least squares
# + a 1x1 conv whose edge tiles have 4 x 1 entries for 20 unknowns: underdetermined, the minimum-norm solution
@pytest.mark.parametrize("geom", GEOMETRIES + [(9, 10, 1, 1, 0, 1, 3, 3, (4, 4, 3, 3), 20)],
                         ids=lambda g: "x".join(map(str, g[:8])) + f"-nc{g[-1]}")
def test_from_dense_codes_are_the_per_tile_least_squares_solution(geom):
    """Per tile: the codes equal numpy's lstsq (minimum norm) on the rows of A_CSG that fall inside the kernel,
    and the residual is orthogonal to those rows' span (the normal equations A_t^T (A_t c - w) = 0)."""
    c, o, k, *_, slice_shape, n_c = geom
    conv = nn.Conv2d(c, o, k).double()
    layer = CSGConv2d.from_dense(conv, CSGConfig(slice_shape=slice_shape, code_size=n_c, init="fit"))
    a = layer.generator.weight.detach().numpy().reshape(*slice_shape, n_c)
    codes = layer.codes_grid().detach().numpy()
    count = 0
    for idx, block in tiles_of(conv.weight.detach().numpy(), slice_shape):
        a_t = a[: block.shape[0], : block.shape[1], : block.shape[2], : block.shape[3]].reshape(-1, n_c)
        expected = np.linalg.lstsq(a_t, block.reshape(-1), rcond=None)[0]
        got = codes[idx]
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
        residual = a_t @ got - block.reshape(-1)
        assert np.abs(a_t.T @ residual).max() < 1e-10 * max(1.0, np.abs(a_t).sum())
        count += 1
    assert count == layer.num_slices
    assert layer.bias is conv.bias
    # from_dense on its own: "auto" means "fit"
    auto = CSGConv2d.from_dense(conv, CSGConfig(slice_shape=slice_shape, code_size=n_c))
    assert auto.config.init == "auto" and torch.equal(auto.codes, layer.codes)


def test_from_dense_recovers_a_kernel_in_the_generators_range():
    gen = SliceGenerator((4, 3, 3, 3), 6, seed=3, dtype=torch.float64)
    cfg = CSGConfig(slice_shape=(4, 3, 3, 3), code_size=6, init="fit")
    source = CSGConv2d(7, 10, 3, config=cfg, generator=gen, dtype=torch.float64)
    conv = source.to_dense()
    layer = CSGConv2d.from_dense(conv, source.config, context=gen)
    assert layer.generator is gen
    torch.testing.assert_close(layer.codes, source.codes, rtol=1e-9, atol=1e-11)  # full-rank tiles only here
    x = torch.randn(2, 7, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-11)


def test_fit_follows_changes_of_the_generator():
    """The cached pseudo-inverses are recomputed when A_CSG changes, also through `.data` (no version bump)."""
    gen = SliceGenerator((4, 3, 3, 3), 6, dtype=torch.float64)
    conv = nn.Conv2d(7, 10, 3).double()
    cfg = CSGConfig(slice_shape=(4, 3, 3, 3), code_size=6, init="fit")
    codes = CSGConv2d.from_dense(conv, cfg, context=gen).codes.detach()
    gen.weight.data.mul_(2)
    torch.testing.assert_close(CSGConv2d.from_dense(conv, cfg, context=gen).codes.detach(), codes / 2)
    with torch.no_grad():
        gen.weight.add_(1)
    refit = CSGConv2d.from_dense(conv, cfg, context=gen).codes_grid().detach()
    a = gen.weight.detach()
    full = conv.weight.detach()[:8, :6].reshape(2, 4, 2, 3, 3, 3).permute(0, 2, 1, 3, 4, 5).reshape(4, 108)
    torch.testing.assert_close(refit[:2, :2].reshape(4, 6), torch.linalg.lstsq(a, full.T).solution.T)


def test_random_generator_fit_keeps_about_nc_over_s_of_the_energy():
    """A random 128-dim code space inside the 2304-dim slice space keeps ~128/2304 of an unstructured kernel's
    energy, so the relative error is ~sqrt(1 - 1/18) = 0.972 (why the paper trains the CSG, 4.2-4.3)."""
    conv = nn.Conv2d(64, 128, 3, padding=1)
    layer = CSGConv2d.from_dense(conv, CSGConfig(init="fit"), name="conv")
    rel = float((layer.weight - conv.weight).detach().norm() / conv.weight.detach().norm())
    assert abs(rel - math.sqrt(1 - 128 / 2304)) < 0.01, rel


def test_fitted_generator_is_the_truncated_svd_of_the_slices():
    """SliceGenerator.fit_ (Eckart-Young): when every tile is whole, the refitted codes' error is the energy of the
    trailing singular values of the slice matrix (the SVD start is the optimum and ALS keeps it), below the random
    generator's; the columns are orthonormal (not rescaled)."""
    cfg = CSGConfig(slice_shape=(2, 3, 3, 3), code_size=6, init="fit")
    convs = [nn.Conv2d(6, 8, 3).double(), nn.Conv2d(9, 4, 3).double(), nn.Conv2d(3, 6, 3).double()]  # 17 slices
    gen = SliceGenerator(cfg.slice_shape, cfg.code_size, dtype=torch.float64)
    before = [CSGConv2d.from_dense(c, cfg, context=gen) for c in convs]
    rows = []
    for c in convs:  # plain loop: the whole slices, each flattened row-major
        for _, block in tiles_of(c.weight.detach().numpy(), cfg.slice_shape):
            assert block.shape == cfg.slice_shape
            rows.append(torch.from_numpy(block.reshape(-1)))
    sv = torch.linalg.svdvals(torch.stack(rows))
    for steps in (0, 3):
        gen.fit_([c.weight for c in convs], steps=steps)
        a = gen.weight.detach()
        torch.testing.assert_close(a.T @ a, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
        err_sq, err_before = 0.0, 0.0
        for c, old in zip(convs, before):
            layer = CSGConv2d.from_dense(c, cfg, context=gen)
            err_sq += float((layer.weight - c.weight).detach().square().sum())
            err_before += float((old.weight - c.weight).detach().square().sum())
        assert err_sq == pytest.approx(float(sv[6:].square().sum()), rel=1e-9)
        assert err_sq == pytest.approx(lstsq_error([c.weight.detach() for c in convs], a, cfg.slice_shape), rel=1e-9)
        assert err_sq < 0.9 * err_before


def test_fit_with_at_most_nc_whole_slices_is_exact():
    """Fewer whole slices than n_c: the generator spans them all (the orthonormal completion fills the rest)."""
    cfg = CSGConfig(slice_shape=(2, 3, 3, 3), code_size=6, init="fit")
    conv = nn.Conv2d(6, 4, 3).double()  # 2 x 2 = 4 slices
    gen = SliceGenerator(cfg.slice_shape, cfg.code_size, dtype=torch.float64).fit_([conv.weight])
    a = gen.weight.detach()
    torch.testing.assert_close(a.T @ a, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    layer = CSGConv2d.from_dense(conv, cfg, context=gen)
    torch.testing.assert_close(layer.weight, conv.weight, rtol=0, atol=1e-12)


# kernels with partial edge tiles: channel counts the slice does not divide, a 1x1 and a 5x5 kernel with 3x3 slices
ALS_CASES = {
    "mixed": ((4, 3, 3, 3), 6, [(7, 10, 3), (9, 5, 1), (6, 8, 5)]),
    "no-whole-slice": ((4, 4, 3, 3), 5, [(9, 10, 1)]),  # 1x1 only: ALS starts from the current (random) A
}


@pytest.mark.parametrize("case", list(ALS_CASES))
def test_alternating_least_squares_over_partial_tiles(case):
    """fit_(steps=k): the total least-squares error over ALL tiles (an independent per-tile lstsq) does not increase
    with k = 0..3, and ends below the random generator's and (here) below the start's."""
    slice_shape, n_c, shapes = ALS_CASES[case]
    weights = [nn.Conv2d(c, o, k).double().weight.detach() for c, o, k in shapes]
    assert any(w.shape[d] % slice_shape[d] for w in weights for d in range(4))  # partial tiles present
    random_a = SliceGenerator(slice_shape, n_c, dtype=torch.float64).weight.detach()
    errors = []
    for steps in range(4):
        gen = SliceGenerator(slice_shape, n_c, dtype=torch.float64).fit_(weights, steps=steps)
        a = gen.weight.detach()
        torch.testing.assert_close(a.T @ a, torch.eye(n_c, dtype=torch.float64), rtol=0, atol=1e-12)
        errors.append(lstsq_error(weights, a, slice_shape))
    random_error = lstsq_error(weights, random_a, slice_shape)
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[3] <= errors[0] and errors[3] < 0.9 * errors[0], errors
    assert errors[3] < 0.5 * random_error, (errors, random_error)
    if case == "no-whole-slice":  # nothing to take an SVD of: steps=0 keeps the current A
        torch.testing.assert_close(
            SliceGenerator(slice_shape, n_c, dtype=torch.float64).fit_(weights, steps=0).weight, random_a,
            rtol=0, atol=1e-12,
        )
        assert errors[0] == pytest.approx(random_error, rel=1e-9)


# ---------------------------------------------------------------------- generator, init
def test_generator_init_orthonormal_seeded_and_codes_match_conv2d_variance():
    """A_CSG: orthonormal columns, the Q of the QR of the seeded Gaussian matrix with R's diagonal positive, so its
    entries look N(0, 1/S) (moments within 5 sigma); a fresh layer's generated kernel has nn.Conv2d's initial
    variance 1 / (3 fan_in) (within 10%: the entries of one slice share the codes), codes within +-sqrt(S / (n_c
    fan_in)) and the bias within nn.Conv2d's +-1/sqrt(fan_in)."""
    gen = SliceGenerator(seed=7)
    a = gen.weight.detach().double()
    assert a.shape == (2304, 128) and gen.weight.dtype == torch.float32
    torch.testing.assert_close(a.T @ a, torch.eye(128, dtype=torch.float64), rtol=0, atol=1e-5)
    gauss = torch.randn(2304, 128, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    r = a.T @ gauss  # = R of gauss = A R
    assert r.tril(-1).abs().max() < 1e-4 * r.abs().max() and bool((r.diagonal() > 0).all())
    flat = a.flatten()
    n = flat.numel()
    assert abs(float(flat.mean())) < 5 / math.sqrt(2304 * n)
    assert abs(float(flat.var()) * 2304 - 1) < 5 * math.sqrt(2 / n)
    assert not torch.equal(SliceGenerator(seed=8).weight, gen.weight)
    assert torch.equal(SliceGenerator(seed=7).weight, gen.weight)
    assert torch.equal(SliceGenerator.from_config(CSGConfig(seed=7)).weight, gen.weight)
    gen64 = SliceGenerator(seed=7, dtype=torch.float64)
    torch.testing.assert_close(gen64.weight.float(), gen.weight, rtol=0, atol=0)
    fan_in = 96 * 9
    layer = CSGConv2d(96, 80, 3, generator=gen)
    var = float(layer.weight.detach().double().var())
    assert var * 3 * fan_in == pytest.approx(1.0, rel=0.1)
    bound = math.sqrt(2304 / (128 * fan_in))
    codes_max, bias_max = float(layer.codes.detach().abs().max()), float(layer.bias.detach().abs().max())
    assert 0.99 * bound < codes_max <= bound
    assert 0.9 / math.sqrt(fan_in) < bias_max <= 1 / math.sqrt(fan_in)


def test_frozen_generator_gets_no_gradient_but_is_saved_and_moved():
    layer = CSGConv2d(5, 7, 3, config=CSGConfig(slice_shape=(3, 2, 3, 3), code_size=5, freeze_generator=True))
    assert layer.generator.frozen and not layer.generator.weight.requires_grad
    layer(torch.randn(2, 5, 6, 6)).square().sum().backward()
    assert layer.generator.weight.grad is None
    assert layer.codes.grad is not None and layer.codes.grad.abs().sum() > 0
    assert "generator.weight" in layer.state_dict()
    layer = layer.to(torch.float64)
    assert layer.generator.weight.dtype == torch.float64 and not layer.generator.weight.requires_grad
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == layer.param_count() == layer.codes.numel() + 7


@pytest.mark.parametrize("shape", [(7, 10, 3), (9, 5, 1)], ids=["3x3", "1x1"])
def test_sgd_step_on_the_codes_moves_each_slice_by_the_projected_dense_step(shape):
    """Effective learning rate: with A_CSG frozen, one SGD step (lr eta) on the codes changes every tile of the
    generated kernel by exactly -eta A_t A_t^T G_t (G = the dense gradient of the generated kernel, A_t the rows of
    the tile's entries inside the kernel), whose norm is at most eta ||G||, the dense layer's step."""
    c, o, k = shape
    slice_shape, n_c, eta = (4, 3, 3, 3), 6, 0.37
    cfg = CSGConfig(slice_shape=slice_shape, code_size=n_c, freeze_generator=True)
    layer = CSGConv2d(c, o, k, padding=k // 2, config=cfg, dtype=torch.float64)
    x = torch.randn(3, c, 6, 5, dtype=torch.float64)
    g_out = torch.randn(3, o, 6, 5, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    dense_w = w0.clone().requires_grad_()
    (F.conv2d(x, dense_w, layer.bias.detach(), padding=k // 2) * g_out).sum().backward()
    grad = dense_w.grad.numpy()
    opt = torch.optim.SGD([layer.codes], lr=eta)
    (layer(x) * g_out).sum().backward()
    bias = layer.bias.detach().clone()
    opt.step()
    assert layer.generator.weight.grad is None and torch.equal(layer.bias, bias)
    delta = (layer.weight.detach() - w0).numpy()
    a = layer.generator.weight.detach().numpy().reshape(*slice_shape, n_c)
    expected = np.zeros_like(delta)
    for idx, g_t in tiles_of(grad, slice_shape):
        a_t = a[tuple(slice(0, e) for e in g_t.shape)].reshape(-1, n_c)
        where = tuple(slice(i * s, i * s + e) for i, s, e in zip(idx, slice_shape, g_t.shape))
        expected[where] = (-eta * a_t @ (a_t.T @ g_t.reshape(-1))).reshape(g_t.shape)
    np.testing.assert_allclose(delta, expected, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(delta) <= eta * np.linalg.norm(grad) * (1 + 1e-12)
    assert np.linalg.norm(delta) > 0


# ---------------------------------------------------------------------- patch
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 18, 3, padding=1,
                                                                                         bias=False))
        self.head = nn.Conv2d(18, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))


CONVERTED = ("body.0", "body.2", "head")
SMALL = CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9)


def trained_looking_net():
    """Net whose convs carry a strong rank-2 component (3x the random part's norm), as training adds low-rank
    structure: none of them looks untrained, so patch's init="auto" fits."""
    model = Net()
    with torch.no_grad():
        for name in CONVERTED:
            w = model.get_submodule(name).weight
            low = torch.randn(w.shape[0], 2) @ torch.randn(2, w[0].numel())
            w += (3 * w.norm() / low.norm() * low).view_as(w)
    assert not any(looks_untrained(model.get_submodule(name).weight) for name in CONVERTED)
    return model


def csg_layers(model):
    return [m for m in model.modules() if isinstance(m, CSGConv2d)]


def dense_weights(model):
    return {name: model.get_submodule(name).weight.detach().clone() for name in CONVERTED}


@pytest.mark.parametrize("config", ["csg", CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, seed=3)])
def test_patch_shares_one_generator_and_keeps_the_first_conv_dense(config):
    model = Net()
    dense_params = sum(p.numel() for p in model.parameters())
    tritonslide.patch(model, config)
    assert type(model.stem) is nn.Conv2d
    layers = csg_layers(model)
    assert [layer._name for layer in layers] == list(CONVERTED)  # 1x1 head: partial kernel slices
    gen = layers[0].generator
    assert all(layer.generator is gen for layer in layers)
    params = list(model.parameters())
    assert sum(p is gen.weight for p in params) == 1
    total = sum(p.numel() for p in params)
    assert total == sum(layer.param_count() for layer in layers) + gen.weight.numel() + model.stem.weight.numel() + 12
    assert total != dense_params
    assert model(torch.randn(2, 3, 7, 6)).shape == (2, 5, 7, 6)


def test_patch_fits_the_generator_to_a_trained_looking_model():
    """init="auto" on trained-looking weights resolves to "fit": the generator is fitted to the targets' slices
    (orthonormal columns, no longer the seeded random one) and every layer's relative weight error is at most 1 and
    below what the seeded random generator gives."""
    model = trained_looking_net()
    dense = dense_weights(model)
    baseline = tritonslide.patch(copy.deepcopy(model), SMALL, generator=SliceGenerator.from_config(SMALL))
    tritonslide.patch(model, SMALL)
    gen = model.head.generator
    assert not torch.equal(gen.weight, SliceGenerator.from_config(SMALL).weight)
    torch.testing.assert_close(gen.weight.T @ gen.weight, torch.eye(9), rtol=0, atol=1e-5)
    for name in CONVERTED:
        layer, random = model.get_submodule(name), baseline.get_submodule(name)
        assert layer.config.init == "fit" and random.config.init == "fit"
        rel = float((layer.weight.detach() - dense[name]).norm() / dense[name].norm())
        rel_random = float((random.weight.detach() - dense[name]).norm() / dense[name].norm())
        assert rel <= 1 and rel < 0.8 * rel_random, (name, rel, rel_random)


def test_patch_of_a_fresh_model_trains_from_scratch_at_the_dense_scale():
    """nn.Conv2d's default init looks untrained, so init="auto" resolves to "scratch": random codes (not a fit of
    the random dense weights) scaled to each dense weight's norm, the seeded generator not fitted, the dense bias
    reused; the layers' config records "scratch"."""
    model = Net()
    dense = dense_weights(model)
    biases = {name: model.get_submodule(name).bias for name in CONVERTED}
    assert all(looks_untrained(w) for w in dense.values())
    tritonslide.patch(model, SMALL)
    gen = model.head.generator
    assert torch.equal(gen.weight, SliceGenerator.from_config(SMALL).weight)
    for name in CONVERTED:
        layer = model.get_submodule(name)
        assert layer.config.init == "scratch" and layer.config == dataclasses.replace(SMALL, init="scratch")
        norm = float(layer.weight.detach().norm())
        assert norm == pytest.approx(float(dense[name].norm()), rel=1e-5)
        assert float((layer.weight.detach() - dense[name]).norm()) > dense[name].norm()  # independent of it
        assert layer.bias is biases[name]
    conv = nn.Conv2d(10, 7, 3)
    nn.init.kaiming_normal_(conv.weight)  # another init scale (torchvision's): kept, not nn's default
    layer = CSGConv2d.from_dense(conv, CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, init="scratch"))
    assert float(layer.weight.detach().norm()) == pytest.approx(float(conv.weight.detach().norm()), rel=1e-5)
    assert layer.bias is conv.bias


def test_patch_with_a_generator_uses_it_as_is():
    """patch(..., generator=g): every layer uses g, never refitted (also on a trained model, where a new generator
    would be fitted), requires_grad from freeze_generator; a generator of another shape, a non-generator and an
    option for a method that takes none are refused before the model changes."""
    model = trained_looking_net()
    g = SliceGenerator(SMALL.slice_shape, SMALL.code_size, seed=11, frozen=True)
    before = g.weight.detach().clone()
    tritonslide.patch(model, SMALL, generator=g)
    assert all(layer.generator is g for layer in csg_layers(model)) and len(csg_layers(model)) == 3
    assert torch.equal(g.weight, before) and g.weight.requires_grad  # freeze_generator=False
    assert all(layer.config.init == "fit" for layer in csg_layers(model))
    frozen_cfg = CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, freeze_generator=True)
    tritonslide.patch(Net(), frozen_cfg, generator=g)
    assert not g.weight.requires_grad and torch.equal(g.weight, before)

    fresh = Net()
    with pytest.raises(ValueError, match=r"generator makes \[4, 4, 3, 3\] slices.*size 9.*asks for \[4, 6, 3, 3\] / 9"):
        tritonslide.patch(fresh, SMALL, generator=SliceGenerator((4, 4, 3, 3), 9))
    with pytest.raises(ValueError, match=r"\[4, 6, 3, 3\] slices from codes of size 8.*asks for \[4, 6, 3, 3\] / 9"):
        tritonslide.patch(fresh, SMALL, generator=SliceGenerator((4, 6, 3, 3), 8))
    with pytest.raises(TypeError, match="generator must be a SliceGenerator, got Linear"):
        tritonslide.patch(fresh, SMALL, generator=nn.Linear(9, 216, bias=False))
    with pytest.raises(TypeError, match=r"'alsh', which takes no options"):
        tritonslide.patch(fresh, "alsh", generator=g)
    with pytest.raises(TypeError, match=r"\['seed'\] for method 'csg', which takes only \['generator'\]"):
        tritonslide.patch(fresh, SMALL, seed=3)
    assert not csg_layers(fresh) and all(type(m) is nn.Conv2d for m in fresh.modules() if isinstance(m, nn.Conv2d))


def test_patch_twice_and_train_and_replace_reuse_the_generator():
    model = tritonslide.patch(Net(), "csg")
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # see test_patch_twice_with_the_same_config_does_not_warn
        tritonslide.patch(model, "csg")
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model = trained_looking_net()
    schedule = tritonslide.TrainAndReplace(model, SMALL, gap=1)
    assert schedule.step() == "head"
    gen = model.head.generator
    fitted = gen.weight.detach().clone()  # a new generator, fitted to the head (TrainAndReplace: init "fit")
    assert not torch.equal(fitted, SliceGenerator.from_config(SMALL).weight)
    assert [schedule.step() for _ in range(3)] == ["body.2", "body.0", None]
    assert all(layer.generator is gen for layer in csg_layers(model)) and len(csg_layers(model)) == 3
    assert torch.equal(gen.weight, fitted)  # reused as is, never refitted
    assert all(layer.config.init == "fit" for layer in csg_layers(model))


def test_patch_twice_with_the_same_config_does_not_warn():
    model = tritonslide.patch(Net(), "csg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tritonslide.patch(model, "csg")


def test_pretrained_frozen_generator_is_used_and_not_refitted():
    """Sec. 4.3: a pre-trained CSG, fixed; only codes (and the rest of the network) train. patch(...,
    generator=pretrained) is the way; attaching it to the patched module (the ModuleDict recipe of the module
    docstring) works too. Either way it is never refitted, also on a trained model."""
    cfg = CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, freeze_generator=True)
    for recipe in ("keyword", "moduledict"):
        pretrained = SliceGenerator(cfg.slice_shape, cfg.code_size, seed=99)
        before = pretrained.weight.detach().clone()
        model = trained_looking_net()
        if recipe == "keyword":
            tritonslide.patch(model, cfg, generator=pretrained)
        else:
            tritonslide.patch(nn.ModuleDict({"model": model, "csg": pretrained}), cfg)
        assert type(model.stem) is nn.Conv2d and len(csg_layers(model)) == 3
        assert all(layer.generator is pretrained for layer in csg_layers(model)) and pretrained.frozen
        assert torch.equal(pretrained.weight, before)
        assert make_context(model, cfg, []) is pretrained
        other = CSGConfig(slice_shape=(4, 4, 3, 3), code_size=9)
        assert make_context(model, other, []) is not pretrained  # a different slice shape needs its own generator
        model.zero_grad()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        assert pretrained.weight.grad is None and all(layer.codes.grad is not None for layer in csg_layers(model))


def test_unpatch_gives_dense_layers_with_the_generated_weights():
    model = tritonslide.patch(Net(), CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9)).eval()
    x = torch.randn(2, 3, 7, 6)
    y = model(x)
    bias = model.body[0].bias
    weights = [layer.generated_weight().detach() for layer in csg_layers(model)]
    tritonslide.unpatch(model)
    assert not csg_layers(model) and all(type(m) is nn.Conv2d for m in (model.body[0], model.body[2], model.head))
    assert all(torch.equal(w, m.weight) for w, m in zip(weights, (model.body[0], model.body[2], model.head)))
    assert model.body[0].bias is bias and model.body[2].bias is None
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)


def test_channels_last_model_and_input():
    """model.to(memory_format=channels_last) works (codes and A_CSG are 2-d); a channels_last input gives a
    channels_last output equal to the NCHW one, and the gradients agree."""
    model = tritonslide.patch(trained_looking_net(), SMALL)
    x = torch.randn(2, 3, 7, 6)
    y = model(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.to(memory_format=torch.channels_last)
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    y_cl = model(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    # the same sums in another order (channels_last kernels): equal up to float32 rounding of outputs of size ~3
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)
    (y_cl * g).sum().backward()
    for n, p in model.named_parameters():  # sums of up to 2 x 7 x 6 x 20 terms in another order
        assert float((p.grad - grads[n]).abs().max()) <= 1e-5 * float(grads[n].abs().max()), n


def test_state_dict_round_trip_keeps_one_shared_generator():
    cfg = CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, seed=2)
    model = tritonslide.patch(Net(), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 6, 6)).square().sum().backward()
    opt.step()  # moves codes and the generator away from a fresh patch's values
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = tritonslide.patch(Net(), cfg)
    assert not torch.equal(fresh.head.generator.weight, model.head.generator.weight)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    gens = {id(layer.generator) for layer in csg_layers(fresh)}
    assert len(gens) == 1 and torch.equal(fresh.head.generator.weight, model.head.generator.weight)
    x = torch.randn(3, 3, 6, 6)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    clone = copy.deepcopy(model)
    assert len({id(layer.generator) for layer in csg_layers(clone)}) == 1
    assert clone.head.generator is not model.head.generator


def test_state_dict_of_a_fitted_model_loads_into_a_scratch_patched_copy():
    """init says only how a layer was first set: a state_dict saved from an init="fit" patch loads into an
    init="scratch" patch of the same method config, and the copy then computes what the original does."""
    trained = trained_looking_net()
    fitted = tritonslide.patch(copy.deepcopy(trained), SMALL, init="fit")
    scratch = tritonslide.patch(copy.deepcopy(trained), SMALL, init="scratch")
    assert {layer.config.init for layer in csg_layers(fitted)} == {"fit"}
    assert {layer.config.init for layer in csg_layers(scratch)} == {"scratch"}
    assert not torch.equal(fitted.head.generator.weight, scratch.head.generator.weight)
    scratch.load_state_dict(fitted.state_dict())
    assert {layer.config.init for layer in csg_layers(scratch)} == {"scratch"}
    assert len({id(layer.generator) for layer in csg_layers(scratch)}) == 1
    assert torch.equal(scratch.head.generator.weight, fitted.head.generator.weight)
    x = torch.randn(2, 3, 6, 5)
    assert torch.equal(scratch(x), fitted(x))


def test_state_dict_from_a_different_config_is_rejected():
    state = tritonslide.patch(Net(), CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9)).state_dict()
    other_seed = tritonslide.patch(Net(), CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, seed=1))
    with pytest.raises(ValueError, match=r"CSGConv2d 'body.0'.*saved with config.*'seed': 0"):
        other_seed.load_state_dict(state)
    same_numel = tritonslide.patch(Net(), CSGConfig(slice_shape=(6, 4, 3, 3), code_size=9))
    with pytest.raises((ValueError, RuntimeError)):
        same_numel.load_state_dict(state)
    gen = SliceGenerator((6, 4, 3, 3), 9)
    with pytest.raises(ValueError, match="slice shape / code size"):
        gen.load_state_dict(SliceGenerator((4, 6, 3, 3), 9).state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        tritonslide.patch(Net(), "csg").load_state_dict(Net().state_dict())


def test_to_float64_keeps_the_generator_shared():
    model = tritonslide.patch(Net(), CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9)).to(torch.float64)
    layers = csg_layers(model)
    assert all(layer.generator is layers[0].generator for layer in layers)
    assert all(layer.codes.dtype == torch.float64 for layer in layers)
    assert model(torch.randn(2, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------------- errors and edge cases
@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.randn(2, 3, 7), ValueError, r"shape \(N, 12, H, W\)"),
        (torch.randn(2, 5, 7, 7), ValueError, r"expected 12 input channels, i.e. shape \(N, 12, H, W\)"),
        (torch.randn(2, 3, 12, 7, 7), ValueError, r"shape \(N, 12, H, W\)"),
        (torch.randn(2, 12, 7, 7, dtype=torch.float64), TypeError, "expected a torch.float32 input"),
        (torch.randn(2, 12, 0, 7), ValueError, r"height 0 \(\+2 padding\) is smaller than the kernel extent 3"),
        (torch.randn(2, 12, 7, 7, device="meta"), ValueError, "input is on meta"),
    ],
)
def test_bad_input_names_the_layer(x, exc, match):
    model = tritonslide.patch(Net(), "csg")
    with pytest.raises(exc, match=match) as info:
        model.body[0](x)
    assert "CSGConv2d 'body.0'" in str(info.value)


def test_empty_batch_and_unbatched_input():
    layer = CSGConv2d(3, 5, 3, padding=1, config=TINY)
    assert layer(torch.randn(0, 3, 7, 6)).shape == (0, 5, 7, 6)
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))
    assert layer.output_shape(4, 7, 6) == (4, 5, 7, 6)


def test_from_dense_and_generator_errors():
    with pytest.raises(ValueError, match=r"from_dense\(x\): cannot convert: groups=2"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2), TINY, name="x")
    with pytest.raises(TypeError, match="CSGConfig"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3), "csg")
    with pytest.raises(ValueError, match=r"CSGConv2d 'y'.*\[3, 2, 3, 3\] slices.*asks for \[16, 16, 3, 3\]"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3), CSGConfig(), name="y", context=SliceGenerator((3, 2, 3, 3), 50))
    with pytest.raises(ValueError, match=r"CSGConv2d 'z'.*torch.float64.*the layer is torch.float32"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3), TINY, name="z", context=SliceGenerator((3, 2, 3, 3), 5,
                                                                                          dtype=torch.float64))
    with pytest.raises(TypeError, match="expected a SliceGenerator, got Linear"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3), TINY, context=nn.Linear(5, 54))
    with pytest.raises(ValueError, match="kernel of shape"):
        CSGConv2d(4, 6, 3, config=TINY).fit_codes_(torch.randn(6, 4, 1, 1))
    # code_size > S: refused when the generator is built, not at the first fit
    with pytest.raises(ValueError, match="code_size 60 exceeds the 54 entries"):
        SliceGenerator((2, 3, 3, 3), 60)
    with pytest.raises(ValueError, match="code_size 60 exceeds the 54 entries"):
        CSGConv2d(4, 6, 3, config=CSGConfig(slice_shape=(2, 3, 3, 3), code_size=60))
    assert SliceGenerator((2, 3, 3, 3), 54).weight.shape == (54, 54)  # n_c == S: a square orthogonal A
    gen = SliceGenerator((2, 3, 3, 3), 6)
    with pytest.raises(ValueError, match="no kernel to fit"):
        gen.fit_([])
    with pytest.raises(ValueError, match=r"expected \(O, C, kh, kw\) kernels, got shape \(6, 4\)"):
        gen.fit_([torch.randn(6, 4)])
    gen.fit_([torch.randn(1, 2, 3, 3)])  # no whole slice: ALS from the current A, no error
    with pytest.raises(ValueError, match="init"):
        CSGConfig(init="unbiased")
    conv = nn.Conv2d(4, 6, 3, padding="same")
    layer = CSGConv2d.from_dense(conv, TINY)
    assert layer.padding == (1, 1) and layer(torch.randn(1, 4, 5, 5)).shape == (1, 6, 5, 5)


def test_counts_for_a_vgg_layer():
    layer = CSGConv2d.from_dense(nn.Conv2d(256, 256, 3, padding=1))
    assert layer.param_count() == 16 * 16 * 128 + 256
    assert layer.generator_param_count() == 2304 * 128
    assert layer.dense_macs(32, 32) == layer.macs(32, 32) == 256 * 256 * 9 * 1024
    assert layer.generation_macs() == 256 * 2304 * 128


def resnet56_convs(option_a=True):
    """The modules of the CIFAR ResNet-56 of the paper (He et al.; the authors' code): a 3->16 stem, 3 stages of
    9 basic blocks (16, 32, 64 channels), BatchNorm after every conv, parameter-free option-A shortcuts, 64->10
    classifier. Only the Parameters matter here."""
    layers, inplanes = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)], 16
    for planes in (16, 32, 64):
        for _ in range(9):
            layers += [nn.Conv2d(inplanes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
                       nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)]
            inplanes = planes
    return nn.Sequential(*layers, nn.Linear(64, 10))


def test_parameter_counts_reproduce_table_1_resnet56():
    """Table 1: ResNet-56 853,018 parameters; CSG-[16,16,3,3]-128 347,162 (2.45x); with the pre-trained, fixed
    CSG 52,250 trainable (16.3x, sec. 4.3)."""
    model = resnet56_convs()
    assert sum(p.numel() for p in model.parameters()) == 853_018
    tritonslide.patch(model, "csg")
    assert sum(p.numel() for p in model.parameters()) == 347_162
    frozen = tritonslide.patch(resnet56_convs(), CSGConfig(freeze_generator=True))
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 52_250
