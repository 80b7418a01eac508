"""CSGConv2d / SliceGenerator (shared/papers/003) against plain references: tile loops, numpy least squares."""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tests.tolerances import assert_close
from tritonslide.configs import CSGConfig
from tritonslide.nn import CSGConv2d, SliceGenerator
from tritonslide.nn.csg import make_context

TINY = CSGConfig(slice_shape=(3, 2, 3, 3), code_size=5)


def reference_weight(codes, a, shape, slice_shape):
    """Plain loops over the tiles: slice = A c, reshaped; the part inside the kernel is copied (footnote 4)."""
    o, c, kh, kw = shape
    s0, s1, s2, s3 = slice_shape
    w = torch.zeros(shape, dtype=codes.dtype)
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            for k in range(codes.shape[2]):
                for m in range(codes.shape[3]):
                    piece = (a @ codes[i, j, k, m]).reshape(slice_shape)
                    e0, e1 = min(s0, o - i * s0), min(s1, c - j * s1)
                    e2, e3 = min(s2, kh - k * s2), min(s3, kw - m * s3)
                    w[i * s0:i * s0 + e0, j * s1:j * s1 + e1, k * s2:k * s2 + e2, m * s3:m * s3 + e3] = (
                        piece[:e0, :e1, :e2, :e3]
                    )
    return w


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
    assert layer.codes.shape == (*grid, n_c) and layer.num_slices == math.prod(grid)
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
    layer = CSGConv2d.from_dense(conv, CSGConfig(slice_shape=slice_shape, code_size=n_c))
    a = layer.generator.weight.detach().numpy().reshape(*slice_shape, n_c)
    w = conv.weight.detach().numpy()
    for i, j, kk, m in np.ndindex(*layer.codes.shape[:4]):
        block = w[i * slice_shape[0]:(i + 1) * slice_shape[0], j * slice_shape[1]:(j + 1) * slice_shape[1],
                  kk * slice_shape[2]:(kk + 1) * slice_shape[2], m * slice_shape[3]:(m + 1) * slice_shape[3]]
        a_t = a[: block.shape[0], : block.shape[1], : block.shape[2], : block.shape[3]].reshape(-1, n_c)
        expected = np.linalg.lstsq(a_t, block.reshape(-1), rcond=None)[0]
        got = layer.codes[i, j, kk, m].detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
        residual = a_t @ got - block.reshape(-1)
        assert np.abs(a_t.T @ residual).max() < 1e-10 * max(1.0, np.abs(a_t).sum())
    assert layer.bias is conv.bias


def test_from_dense_recovers_a_kernel_in_the_generators_range():
    gen = SliceGenerator((4, 3, 3, 3), 6, seed=3, dtype=torch.float64)
    source = CSGConv2d(7, 10, 3, config=CSGConfig(slice_shape=(4, 3, 3, 3), code_size=6), generator=gen,
                       dtype=torch.float64)
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
    cfg = CSGConfig(slice_shape=(4, 3, 3, 3), code_size=6)
    codes = CSGConv2d.from_dense(conv, cfg, context=gen).codes.detach()
    gen.weight.data.mul_(2)
    torch.testing.assert_close(CSGConv2d.from_dense(conv, cfg, context=gen).codes.detach(), codes / 2)
    with torch.no_grad():
        gen.weight.add_(1)
    refit = CSGConv2d.from_dense(conv, cfg, context=gen).codes.detach()
    a = gen.weight.detach()
    full = conv.weight.detach()[:8, :6].reshape(2, 4, 2, 3, 3, 3).permute(0, 2, 1, 3, 4, 5).reshape(4, 108)
    torch.testing.assert_close(refit[:2, :2].reshape(4, 6), torch.linalg.lstsq(a, full.T).solution.T)


def test_random_generator_fit_keeps_about_nc_over_s_of_the_energy():
    """A random 128-dim code space inside the 2304-dim slice space keeps ~128/2304 of an unstructured kernel's
    energy, so the relative error is ~sqrt(1 - 1/18) = 0.972 (why the paper trains the CSG, 4.2-4.3)."""
    conv = nn.Conv2d(64, 128, 3, padding=1)
    layer = CSGConv2d.from_dense(conv, name="conv")
    rel = float((layer.weight - conv.weight).detach().norm() / conv.weight.detach().norm())
    assert abs(rel - math.sqrt(1 - 128 / 2304)) < 0.01, rel


def test_fitted_generator_is_the_truncated_svd_of_the_slices():
    """SliceGenerator.fit_ (Eckart-Young): with the codes refitted, the error over whole slices is the energy
    of the trailing singular values of the slice matrix, and no worse than with the random generator."""
    cfg = CSGConfig(slice_shape=(2, 3, 3, 3), code_size=6)
    convs = [nn.Conv2d(6, 8, 3).double(), nn.Conv2d(9, 4, 3).double(), nn.Conv2d(5, 4, 3).double()]  # 5: partial
    gen = SliceGenerator(cfg.slice_shape, cfg.code_size, dtype=torch.float64)
    before = [CSGConv2d.from_dense(c, cfg, context=gen) for c in convs]
    gen.fit_([c.weight for c in convs])
    a = gen.weight.detach()
    torch.testing.assert_close(a.T @ a, torch.eye(6, dtype=torch.float64) * 54 / 6)  # columns of norm^2 S / n_c
    rows = []
    for c in convs:
        w = c.weight.detach()
        for i, j in np.ndindex(w.shape[0] // 2, w.shape[1] // 3):
            rows.append(w[2 * i:2 * i + 2, 3 * j:3 * j + 3].reshape(-1))
    sv = torch.linalg.svdvals(torch.stack(rows))
    err_sq, err_before = 0.0, 0.0
    for c, old in zip(convs, before):
        layer = CSGConv2d.from_dense(c, cfg, context=gen)
        full = layer.weight.shape[1] // 3 * 3
        err_sq += float((layer.weight - c.weight)[:, :full].detach().square().sum())
        err_before += float((old.weight - c.weight)[:, :full].detach().square().sum())
    assert err_sq == pytest.approx(float(sv[6:].square().sum()), rel=1e-9)
    assert err_sq < err_before
    with pytest.raises(ValueError, match="no kernel holds a whole"):
        gen.fit_([torch.randn(1, 2, 3, 3)])
    with pytest.raises(ValueError, match="code_size 60 exceeds the 54 entries"):
        SliceGenerator((2, 3, 3, 3), 60).fit_([torch.randn(4, 6, 3, 3)])


# ---------------------------------------------------------------------- generator, init
def test_generator_and_codes_init_match_conv2d_variance():
    """A_CSG ~ N(0, 1/n_c) (fixed seed; moments within 5 sigma) and a fresh layer's generated kernel has
    nn.Conv2d's initial variance 1 / (3 fan_in) (within 10%: the entries of one slice share A_CSG's rows)."""
    gen = SliceGenerator(seed=7)
    a = gen.weight.detach().double().flatten()
    n = a.numel()
    assert abs(float(a.mean())) < 5 / math.sqrt(128 * n)
    assert abs(float(a.var()) * 128 - 1) < 5 * math.sqrt(2 / n)
    assert not torch.equal(SliceGenerator(seed=8).weight, gen.weight)
    assert torch.equal(SliceGenerator(seed=7).weight, gen.weight)
    layer = CSGConv2d(96, 80, 3, generator=gen)
    var = float(layer.weight.detach().double().var())
    assert var * 3 * 96 * 9 == pytest.approx(1.0, rel=0.1)


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


def csg_layers(model):
    return [m for m in model.modules() if isinstance(m, CSGConv2d)]


@pytest.mark.parametrize("config", ["csg", CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, seed=3)])
def test_patch_shares_one_generator_and_keeps_the_first_conv_dense(config):
    model = Net()
    dense_params = sum(p.numel() for p in model.parameters())
    tritonslide.patch(model, config)
    assert type(model.stem) is nn.Conv2d
    layers = csg_layers(model)
    assert [layer._name for layer in layers] == ["body.0", "body.2", "head"]  # 1x1 head: partial kernel slices
    gen = layers[0].generator
    assert all(layer.generator is gen for layer in layers)
    params = list(model.parameters())
    assert sum(p is gen.weight for p in params) == 1
    total = sum(p.numel() for p in params)
    assert total == sum(layer.param_count() for layer in layers) + gen.weight.numel() + model.stem.weight.numel() + 12
    assert total != dense_params
    assert model(torch.randn(2, 3, 7, 6)).shape == (2, 5, 7, 6)


def test_patch_twice_and_train_and_replace_reuse_the_generator():
    model = tritonslide.patch(Net(), "csg")
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    tritonslide.patch(model, "csg")
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model = Net()
    schedule = tritonslide.TrainAndReplace(model, CSGConfig(), gap=1)
    assert [schedule.step() for _ in range(4)] == ["head", "body.2", "body.0", None]
    gens = {id(layer.generator) for layer in csg_layers(model)}
    assert len(gens) == 1 and len(csg_layers(model)) == 3


def test_pretrained_frozen_generator_attached_to_the_model_is_used():
    """Sec. 4.3: a pre-trained CSG, fixed; only codes (and the rest of the network) train."""
    cfg = CSGConfig(slice_shape=(4, 6, 3, 3), code_size=9, freeze_generator=True)
    pretrained = SliceGenerator(cfg.slice_shape, cfg.code_size, seed=99)
    model = Net()
    tritonslide.patch(nn.ModuleDict({"model": model, "csg": pretrained}), cfg)  # the recipe of the module docstring
    assert type(model.stem) is nn.Conv2d and len(csg_layers(model)) == 3
    assert all(layer.generator is pretrained for layer in csg_layers(model)) and pretrained.frozen
    assert make_context(model, cfg) is pretrained
    other = CSGConfig(slice_shape=(4, 4, 3, 3), code_size=9)
    assert make_context(model, other) is not pretrained  # a different slice shape needs its own generator
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


def test_from_dense_errors():
    with pytest.raises(ValueError, match=r"from_dense\(x\): cannot convert: groups=2"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2), TINY, name="x")
    with pytest.raises(TypeError, match="CSGConfig"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3), "csg")
    with pytest.raises(ValueError, match=r"CSGConv2d 'y'.*\[3, 2, 3, 3\] slices.*asks for \[16, 16, 3, 3\]"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3), CSGConfig(), name="y", context=SliceGenerator((3, 2, 3, 3), 128))
    with pytest.raises(ValueError, match=r"CSGConv2d 'z'.*torch.float64.*the layer is torch.float32"):
        CSGConv2d.from_dense(nn.Conv2d(4, 6, 3), TINY, name="z", context=SliceGenerator((3, 2, 3, 3), 5,
                                                                                          dtype=torch.float64))
    with pytest.raises(ValueError, match="kernel of shape"):
        CSGConv2d(4, 6, 3, config=TINY).fit_codes_(torch.randn(6, 4, 1, 1))
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
