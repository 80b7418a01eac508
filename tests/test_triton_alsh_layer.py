"""ALSH layers end to end on the Triton kernels (hash + histogram, active-filter GEMM): the same outputs, gradients
and active sets as on the PyTorch fallback, unlinked (device-side set, no host sync) and linked (compact hand-off).

Runs on CUDA when present (marker ``gpu``), else on CPU in Triton's interpreter; tiny shapes.
"""

import copy

import pytest
import torch
from torch import nn
from triton_utils import DEVICES, requires_triton

import tritonslide
from tests.tolerances import assert_close

pytestmark = requires_triton


def run(model, x, backend):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with tritonslide.use_backend(backend):
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("linked", [False, True], ids=["unlinked", "linked"])
def test_alsh_model_on_triton_equals_torch(device, linked):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 9, 3, padding=1), nn.ReLU(),
        nn.Conv2d(9, 7, 3, stride=2, padding=1),
    )
    cfg = tritonslide.ALSHConfig(tables=3, bits=3, top_buckets=2, share_active_set=linked)
    tritonslide.patch(model, cfg, filter_fn=lambda m, n: True)
    assert model[2]._publish == linked  # unlinked layers keep their set on the device (out_count, no host sync)
    model = model.to(device)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 9, 8, device=device)
    y_k, dx_k, g_k = run(model, x, "triton")
    y_t, dx_t, g_t = run(twin, x, "torch")
    for a, b in zip(tritonslide.stats(model).values(), tritonslide.stats(twin).values()):
        assert a.active_fraction == b.active_fraction  # the same sets were chosen
    assert_close(y_k, y_t, torch.float32, reduction=9 * 9)
    assert_close(dx_k, dx_t, torch.float32, reduction=9 * 9)
    for name in g_t:
        if g_t[name] is None:
            assert g_k[name] is None or not g_k[name].any()
        else:
            assert_close(g_k[name], g_t[name], torch.float32, reduction=2 * 9 * 8, msg=name)
