"""Converted models behave like models (issue #10): every method, on the package's standard architectures.

- a fresh model patched for training from scratch keeps each layer's output scale and trains with the dense
  model's optimizer and learning rate without diverging;
- a trained model converts without amplifying its error and fine-tunes back to within 3 points of dense;
- channels_last models and inputs, patch's edge cases, and non-finite inputs.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tritonslide import models
from tritonslide.nn import ALSHConv2d, ALSHSelector, CSGConv2d, LowRankConv2d, MILFConv2d, SketchConv2d

METHODS = ("alsh", "sketch", "milf", "lowrank", "csg")
LAYER_TYPES = (ALSHConv2d, SketchConv2d, MILFConv2d, LowRankConv2d, CSGConv2d)

needs_demo_extras = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("tqdm") is None,
    reason="needs pip install 'tritonslide[demo]'",
)


def patched(model: nn.Module, method: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left dense (too small to sketch, depthwise) are listed: expected
        return tritonslide.patch(model, method, **kwargs)


def converted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


# ---------------------------------------------------------------------- training from scratch
@pytest.mark.parametrize("arch", ["vgg11", "resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("method", METHODS)
def test_fresh_model_keeps_every_layers_output_scale(arch, method):
    """Item 1: patching a freshly initialized model gives layers whose output std on standard-normal input is
    within a factor of 2 of the dense layer's (measured 0.97-1.03 for sketch, lowrank and csg). ALSH and MILF
    output zeros on the filters they skip (that is the method); their scale is compared on the computed
    channels."""
    torch.manual_seed(0)
    dense = models.get_model(arch, num_classes=10).eval()
    model = patched(copy.deepcopy(dense), method).eval()
    dense_modules = dict(dense.named_modules())
    layers = converted_layers(model)
    assert len(layers) >= 4
    for name, layer in layers:
        ref = dense_modules[name]
        x = torch.randn(3, ref.in_channels, 7, 9)
        with torch.no_grad():
            y, y_ref = layer(x), ref(x)
        if isinstance(layer, ALSHSelector):
            # (sample, filter) pairs computed: in eval each sample has its own set (ALSHConfig.selection)
            active = y.abs().amax((2, 3)) > 0
            assert active.any()
            y, y_ref = y[active], y_ref[active]
        ratio = float(y.std() / y_ref.std())
        assert 0.5 <= ratio <= 2.0, (name, ratio)
    if method != "alsh":
        assert all(layer.config.to_dict().get("init", "scratch") in ("scratch",) or method == "milf"
                   for _, layer in layers)


@pytest.mark.slow
@pytest.mark.parametrize("arch, size", [("vgg11", 32), ("vgg11_bn", 32), ("resnet18", 16), ("mobilenet_v2", 16)])
def test_fresh_patched_models_train_with_the_dense_optimizer(arch, size):
    """Item 1: SGD (lr 0.01, momentum 0.9, the setting that sent a sketched VGG-11 to 1e8 and NaN) trains every
    method without diverging: every loss is finite and no larger than twice the dense model's largest loss on the
    same batches (dense VGG-11-BN itself swings between 2.3 and 9.5 at this learning rate and batch)."""
    torch.manual_seed(0)
    base = models.get_model(arch, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 3, size, size, generator=gen)
    labels = torch.randint(0, 10, (4, 8), generator=gen)

    def losses(model: nn.Module) -> list[float]:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        out = []
        model.train()
        for xb, yb in zip(x, labels):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    torch.manual_seed(2)
    dense = losses(copy.deepcopy(base))
    assert all(math.isfinite(v) for v in dense)
    for method in METHODS:
        torch.manual_seed(2)
        got = losses(patched(copy.deepcopy(base), method))
        assert all(math.isfinite(v) and v <= 2 * max(dense) for v in got), (method, got, dense)


def test_sgd_step_on_factored_layers_moves_the_weight_at_most_the_dense_step():
    """The effective learning rate of a product of factors: one plain SGD step (lr 1) on a factored layer moves its
    effective weight W by at most what the same step moves a dense weight (||dW|| <= ||G||, G = dL/dW), for
    sketch (orthonormal bases of the random row spaces) and CSG codes (orthonormal generator columns); with the
    paper's scaled signs the sketch step was ~O/k = 8x the dense one here."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 128, 3, padding=1)
    x = torch.randn(2, 24, 6, 6)
    for layer, params in (
        (SketchConv2d.from_dense(conv, tritonslide.SketchConfig(mode="output")), ("s1",)),
        (SketchConv2d.from_dense(conv, tritonslide.SketchConfig(mode="both", k=4)), ("s1", "s2")),
        (CSGConv2d.from_dense(conv, tritonslide.CSGConfig(slice_shape=(8, 8, 3, 3), code_size=40,
                                                         freeze_generator=True)), ("codes",)),
    ):
        w0 = layer.weight.detach().clone()
        g = torch.randn(2, 128, 6, 6)
        dense_w = w0.clone().requires_grad_()
        F.conv2d(x, dense_w, None, 1, 1).backward(g)
        layer(x).backward(g)
        with torch.no_grad():
            for name in params:
                getattr(layer, name).sub_(getattr(layer, name).grad)
        step = layer.weight.detach() - w0
        assert float(step.norm()) <= float(dense_w.grad.norm()) * (1 + 1e-5), type(layer).__name__
        assert float(step.norm()) > 0.05 * float(dense_w.grad.norm())  # and it does move


# ---------------------------------------------------------------------- converting a trained model
@needs_demo_extras
@pytest.mark.slow
def test_trained_model_converts_and_fine_tunes_within_3_points():
    """Item 3 (the README's table): the 3-layer digits CNN trained dense for 12 epochs (98.0%), converted with every
    method's default config, fine-tuned 12 epochs with the same optimizer (Adam, lr 1e-3). Measured on the team's
    CPU: alsh 96.4, sketch 97.8, milf 96.0 (per-sample sets, demo._convert_config), lowrank 97.6, csg 98.2
    (dense 98.0). Factored layers never amplify:
    the largest relative weight error of a converted layer is below 1."""
    from tritonslide import demo

    rows = {row["method"]: row for row in demo.convert_and_finetune(progress=False)}
    dense = rows.pop("dense")
    assert dense["accuracy"] > 0.95
    for method, row in rows.items():
        assert row["accuracy"] >= dense["accuracy"] - 0.03, (method, row)
        if row["weight_error"] is not None:
            assert row["weight_error"] < 1.0, (method, row)
            assert row["output_error"] < 1.0, (method, row)


def _trained_like(conv: nn.Conv2d) -> nn.Conv2d:
    """A conv whose weight has the low-rank structure that training adds (so patch fits it)."""
    torch.manual_seed(3)
    o, f = conv.weight.shape[0], conv.weight[0].numel()
    with torch.no_grad():
        spike = torch.randn(o, 2) @ torch.randn(2, f) * 0.3 / math.sqrt(f)
        conv.weight.add_(spike.view_as(conv.weight))
    assert not tritonslide.nn.looks_untrained(conv.weight)
    return conv


@pytest.mark.parametrize("method", ["sketch", "milf", "lowrank", "csg"])
def test_conversion_of_a_trained_layer_never_amplifies(method):
    """Item 2: ``patch`` fits a trained layer (least squares given the fixed parts): relative weight and output
    error below 1 (the issue measured 2.65 for sketch and 2.29 for milf on a 64->128 conv with the paper's
    estimator). MILF's output is compared on its active filters (the others are zero by design)."""
    conv = _trained_like(nn.Conv2d(64, 128, 3, padding=1))
    layer = patched(conv, method)
    assert isinstance(layer, LAYER_TYPES) and layer.config.to_dict().get("init", layer.config.to_dict()
                                                                          .get("sketch", {}).get("init")) == "fit"
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        y, y_ref = layer(x), conv(x)
        weight_error = float((layer.weight - conv.weight).norm() / conv.weight.norm())
    if isinstance(layer, ALSHSelector):
        active = y.abs().amax((0, 2, 3)) > 0
        y, y_ref = y[:, active], y_ref[:, active]
    assert weight_error < 1.0
    assert float((y - y_ref).norm() / y_ref.norm()) < 1.0


def test_unbiased_init_keeps_the_papers_estimator():
    """``init="unbiased"`` is still there: on a trained-like 64->128 conv its error is the paper's (above 1)."""
    conv = _trained_like(nn.Conv2d(64, 128, 3, padding=1))
    layer = SketchConv2d.from_dense(conv, tritonslide.SketchConfig(init="unbiased"))
    error = float((layer.weight - conv.weight).detach().norm() / conv.weight.detach().norm())
    assert error > 1.5  # sqrt(d1 / (l k)) = sqrt(128 / 16) = 2.8 in expectation


# ---------------------------------------------------------------------- memory format
@pytest.mark.parametrize("method", METHODS)
def test_channels_last_model_gives_the_same_channels_last_output(method):
    """Item 5: ``.to(memory_format=torch.channels_last)`` works for every method (no parameter is 5-d) and a
    channels_last input gives a channels_last output equal to the NCHW one, layer by layer (as nn.Conv2d)."""
    torch.manual_seed(0)
    model = patched(models.resnet18(num_classes=7), method).eval()
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        y = model(x)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        y_cl = cl(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)
        for name, layer in converted_layers(cl):
            xin = torch.randn(2, layer.in_channels, 6, 5).to(memory_format=torch.channels_last)
            out = layer(xin)
            assert out.is_contiguous(memory_format=torch.channels_last), name
            # the same sums in another order: float32 rounding of outputs of size ~3 (1.1e-6 measured)
            torch.testing.assert_close(out, layer(xin.contiguous()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- patch edge cases
@pytest.mark.parametrize("method", METHODS)
def test_patch_of_a_single_conv_returns_the_converted_layer(method):
    """Item 6: a model that is itself one convertible conv is converted (the first-conv rule would leave nothing),
    and the converted layer is the return value."""
    conv = nn.Conv2d(16, 96, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = tritonslide.patch(conv, method)
    assert isinstance(layer, LAYER_TYPES) and layer is not conv
    assert layer(torch.randn(2, 16, 5, 5)).shape == (2, 96, 3, 3)


def test_patch_warns_when_the_only_conv_is_the_first():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.warns(UserWarning, match=r"nothing converted.*'0'.*filter_fn"):
        tritonslide.patch(model, "alsh")
    assert type(model[0]) is nn.Conv2d


def test_patching_with_another_method_warns_and_names_the_layers():
    """Item 6: the layers of an ALSH-patched model keep ALSH when it is patched with sketch; the warning names them.
    Patching again with the same config stays silent."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1))
    tritonslide.patch(model, "alsh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tritonslide.patch(model, "alsh")
    with pytest.warns(UserWarning, match=r"2 layer\(s\) already converted keep.*'sketch': 2 \(alsh\), 4 \(alsh\)"):
        tritonslide.patch(model, "sketch")
    assert isinstance(model[2], ALSHConv2d) and isinstance(model[4], ALSHConv2d)


def test_patch_init_option_and_unknown_options():
    conv = _trained_like(nn.Conv2d(16, 48, 3))
    assert patched(copy.deepcopy(conv), "sketch", init="scratch").config.init == "scratch"
    assert patched(copy.deepcopy(conv), "milf", init="unbiased").config.sketch.init == "unbiased"
    with pytest.raises(TypeError, match="init= applies to the methods that factor"):
        tritonslide.patch(copy.deepcopy(conv), "alsh", init="fit")
    with pytest.raises(ValueError, match="init must be one of"):
        tritonslide.patch(copy.deepcopy(conv), "lowrank", init="unbiased")
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['generator'\] for method 'sketch'"):
        tritonslide.patch(copy.deepcopy(conv), "sketch", generator=None)


# ---------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_sample_never_comes_out_finite_and_others_stay_finite(method, bad):
    """Item 7: one sample with a NaN / inf pixel: its output is not all finite, every other sample's is. Methods
    without selection give the other samples exactly their output without the bad one; ALSH / MILF choose the
    active set per batch, so there the bad sample may change the others' active sets (documented), never their
    finiteness."""
    torch.manual_seed(0)
    model = patched(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 24, 3, padding=1), nn.Flatten()),
                    method).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        clean = model(x)
        x[1, 0, 3, 4] = bad
        y = model(x)
    assert not torch.isfinite(y[1]).all()
    others = [0, 2, 3]
    assert torch.isfinite(y[others]).all()
    if method not in ("alsh", "milf"):
        torch.testing.assert_close(y[others], clean[others], rtol=0, atol=1e-6)
