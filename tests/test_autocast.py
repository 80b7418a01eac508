"""Autocast: every patched layer behaves like the dense layer it replaces inside ``torch.autocast``.

It accepts float32 and low-precision inputs, computes in the autocast dtype and returns it (as ``nn.Conv2d`` and
``nn.Linear`` do there), its gradients reach the float32 Parameters in float32, and its low-precision error is of
the dense layer's order. The ALSH active set is chosen from the input values as they arrive, projected in float32.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tritonslide import ALSHConfig, MILFConfig, ops

METHODS = ("alsh", "sketch", "milf", "lowrank", "csg")
PARTIAL = ALSHConfig(tables=2, bits=4, top_buckets=3)
# A patched layer's relative error under autocast may be at most this multiple of the dense layer's (plus a floor):
# both round the same operands to the autocast dtype once; a factored layer rounds an intermediate as well.
ERROR_FACTOR, ERROR_FLOOR = 3.0, 2e-3
# relative gradient error under bf16 / fp16 autocast (per Parameter, Frobenius): measured 0.19-0.42% with bf16 on
# CPU for every method (the dense conv's output error there: 0.29%)
GRAD_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _config(method: str):
    return {"alsh": PARTIAL, "milf": MILFConfig(alsh=PARTIAL)}.get(method, method)


def _layer_pair(method: str, device: str = "cpu"):
    """(dense conv, its patched twin) with the same weights: conv 20 -> 36 (3x3, padding 1), not powers of two."""
    model = nn.Sequential(nn.Conv2d(3, 20, 3), nn.Conv2d(20, 36, 3, padding=1)).to(device)
    dense = copy.deepcopy(model[1])
    layer = tritonslide.patch(model, _config(method))[1]
    assert type(layer) is not nn.Conv2d
    if method in ("sketch", "milf", "lowrank", "csg"):  # approximations: compare against their own dense weight
        dense.weight.data.copy_(layer.to_dense().weight.detach() if method != "csg" else layer.generated_weight())
    return dense, layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _check_layer_under_autocast(method: str, device: str, dtype: torch.dtype) -> None:
    dense, layer = _layer_pair(method, device)
    x = torch.randn(3, 20, 11, 13, device=device)
    g = torch.randn(3, 36, 11, 13, device=device)
    y32 = layer(x)
    grads32 = torch.autograd.grad((y32 * g).sum(), [p for p in layer.parameters()])
    with torch.autocast(device, dtype=dtype):
        y_dense = dense(x)
        y = layer(x)
    assert y.dtype == y_dense.dtype == dtype
    assert _rel(y, y32) <= ERROR_FACTOR * _rel(y_dense, dense(x)) + ERROR_FLOOR
    grads = torch.autograd.grad((y.float() * g).sum(), [p for p in layer.parameters()])
    for (name, p), grad, ref in zip(layer.named_parameters(), grads, grads32):
        assert grad.dtype == p.dtype == torch.float32, name
        assert _rel(grad, ref) <= GRAD_RTOL[dtype], f"{method}: gradient of {name}"


@pytest.mark.parametrize("method", METHODS)
def test_layers_compute_and_return_bf16_under_cpu_autocast(method):
    _check_layer_under_autocast(method, "cpu", torch.bfloat16)


def test_alsh_active_set_under_autocast_is_chosen_from_the_input_values():
    """A bf16 input (the output of an earlier autocast layer) is hashed as it is, in float32 projections: the same
    active set as the float32 layer on the same values. A float32 input keeps the float32 choice."""
    _, layer = _layer_pair("alsh")
    x = torch.randn(3, 20, 11, 13).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    chosen = layer.last_active_counts
    y_ref = layer(x.float())
    assert y.dtype == torch.bfloat16 and layer.last_active_counts == chosen
    inactive = y_ref.abs().sum((0, 2, 3)) == 0
    assert inactive.any() and torch.equal(y.abs().sum((0, 2, 3)) == 0, inactive)


def test_sketch_linear_under_autocast():
    model = nn.Sequential(nn.Flatten(), nn.Linear(300, 170), nn.ReLU(), nn.Linear(170, 10))
    layer = tritonslide.patch(model, "sketch")[1]
    assert isinstance(layer, tritonslide.nn.SketchLinear)
    x = torch.randn(5, 300)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_dense = F.linear(x, layer.reconstructed_weight().detach(), layer.bias)
    assert y.dtype == y_dense.dtype == torch.bfloat16
    assert _rel(y, y32) <= ERROR_FACTOR * _rel(y_dense, y32) + ERROR_FLOOR
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_patched_model_trains_under_cpu_autocast(method):
    """A whole patched CNN, forward and backward inside autocast, two SGD steps: finite, decreasing nothing in
    particular, but every converted layer saw and returned bf16."""
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 40, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(40, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))
    with pytest.warns(UserWarning) if method == "sketch" else contextlib.nullcontext():
        model = tritonslide.patch(model, _config(method))
    seen = []
    for module in model.modules():
        if tritonslide._registry.is_tritonslide_layer(module):
            module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_ops_cast_like_conv2d_under_autocast():
    x, w, b = torch.randn(2, 5, 9, 7), torch.randn(6, 5, 3, 3), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.active_conv2d(x, w, b, torch.tensor([1, 3, 4]))
        ref = F.conv2d(x, w, b)
        z = ops.sketch_conv2d(x, torch.randn(4, 5, 3, 3), torch.randn(6, 4))
    assert y.dtype == ref.dtype == z.dtype == torch.bfloat16
    # float64 is not autocast's to cast (as for F.conv2d): it runs in float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.active_conv2d(x.double(), w.double()).dtype == torch.float64



# ---------------------------------------------------------------------- CUDA (run where a GPU is present)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_layers_under_cuda_autocast(method, dtype):
    _check_layer_under_autocast(method, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_grad_scaler_loop_on_cuda(method):
    """The standard mixed-precision recipe: fp16 autocast + GradScaler, five steps, finite losses, steps taken."""
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 40, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10)).cuda()
    model = tritonslide.patch(model, _config(method))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        x, y = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
