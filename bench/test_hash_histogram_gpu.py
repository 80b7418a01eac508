"""GPU benchmark of the fused hash + histogram kernel (kernels/hash_histogram.py), issue #4.

    python -m pytest bench/test_hash_histogram_gpu.py --benchmark-only

At the input of every conv of AlexNet and VGG-11 (torchvision layer settings, batch 64, 224x224 and 32x32 images;
``bench.utils.conv_layer_inputs``), fp16 and bf16, with the default ALSH planes (L=3 tables of K=5 bits), variants
timed in the same run:

- ``unfused``: the torch pipeline the kernel replaces: cuDNN conv of x with the planes (in x's dtype), sign, bit
  packing, bincount (:func:`unfused`);
- ``triton``: ``tritonslide.ops.hash_histogram`` on the Triton backend (NCHW input);
- ``triton_atomic``: the same kernel with one global atomic add per position instead of the per-program
  histogram (the alternative the issue asks to measure);
- ``triton_channels_last``: the kernel on a channels_last copy of the input.

Every Triton record stores ``ratio_vs["unfused"]`` (target >= 4) and ``floor_ratio`` = time / memory floor, the
floor being the time to read x once at the measured device copy bandwidth (target <= 1.5). Results go to
bench/results/<gpu>.json. Skipped without CUDA. Nothing here asserts a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritonslide
from bench.gpu import memory_floor_s, time_cuda
from bench.utils import alexnet_features, conv_layer_inputs, vgg11_features
from tritonslide import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

TABLES, BITS = 3, 5
NETS = {"alexnet": alexnet_features, "vgg11": vgg11_features}
SIZES = (224, 32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("unfused", "triton", "triton_atomic", "triton_channels_last")


def _cases():
    for net, build in NETS.items():
        model = build()
        for size in SIZES:
            for name, conv, shape in conv_layer_inputs(model, size):
                yield f"{net}{size}-conv{name}", conv, shape


CASES = list(_cases())


def unfused(x: torch.Tensor, planes: torch.Tensor, bits: int, stride, padding, dilation) -> torch.Tensor:
    """The torch pipeline: cuDNN conv with the planes as filters, sign, pack K bits per table, bincount."""
    proj = F.conv2d(x, planes, None, stride, padding, dilation)
    n, p, ho, wo = proj.shape
    tables = p // bits
    signs = (proj >= 0).view(n, tables, bits, ho, wo).to(torch.int32)
    weights = (1 << torch.arange(bits, device=x.device, dtype=torch.int32)).view(1, 1, bits, 1, 1)
    codes = (signs * weights).sum(2, dtype=torch.int32)
    offsets = torch.arange(tables, device=x.device, dtype=torch.int32).view(1, tables, 1, 1) << bits
    return torch.bincount((codes + offsets).flatten(), minlength=tables << bits).view(tables, 1 << bits)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("case", "conv", "shape"), CASES, ids=[c[0] for c in CASES])
def test_hash_histogram(benchmark, bench_records, monkeypatch, case, conv, shape, dtype, variant):
    import tritonslide.kernels.hash_histogram as kernel_module

    torch.manual_seed(0)
    dt = DTYPES[dtype]
    x = torch.randn(shape, device="cuda", dtype=dt)
    planes = torch.randn(TABLES * BITS, shape[1], *conv.kernel_size, device="cuda", dtype=dt)
    args = (BITS, conv.stride, conv.padding, conv.dilation)
    benchmark.group = f"hash-{case}-{dtype}"
    if variant == "unfused":
        fn = lambda: unfused(x, planes, *args)  # noqa: E731
    else:
        if variant == "triton_atomic":
            monkeypatch.setattr(kernel_module, "LOCAL_HIST_MAX_BUCKETS", 0)
        xin = x.to(memory_format=torch.channels_last) if variant == "triton_channels_last" else x

        def fn():
            with tritonslide.use_backend("triton"):
                return ops.hash_histogram(xin, planes, *args)

    hist = fn()  # first call: compile + autotune, untimed
    assert int(hist.sum()) == int(unfused(x, planes, *args).sum())  # every patch counted once per table
    timing = time_cuda(benchmark, fn)
    if not timing:
        return
    floor = memory_floor_s(x)
    record = {
        "group": benchmark.group,
        "variant": variant,
        "case": case,
        "input_shape": list(shape),
        "kernel": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dtype": dtype,
        "tables": TABLES,
        "bits": BITS,
        "memory_floor_s": floor,
        "floor_ratio": timing["p50_s"] / floor,
        **timing,
    }
    if variant != "unfused":
        record["compare_to"] = ["unfused"]
    bench_records[benchmark.fullname] = record
