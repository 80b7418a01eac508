"""GPU benchmark of the fused hash + histogram kernel (kernels/hash_histogram.py), issue #4.

    python -m pytest bench/test_hash_histogram_gpu.py --benchmark-only [--bench-scale quick|dry]

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

Scales (``--bench-scale``, bench/gpu.py): ``full`` as above (26 inputs x 2 dtypes x 4 variants = 208 tests);
``quick``: the input of VGG-11's 512->512 conv @28 (64 x 512 x 28 x 28: 51 MB in half precision), the layer every
quick list times (the ALSH layer file then reuses its compiles and autotune keys), fp16 and bf16, all four
variants: 8 tests; ``dry``: one 16-channel 8x8 input (3x3 planes, batch 2), fp16 and fp32, on the CPU in
Triton's interpreter (the memory floor from the CPU's copy bandwidth): 8 tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritonslide
from bench.gpu import (
    DTYPES,
    ROUNDS,
    WARMUP,
    CaseCost,
    bench_scale,
    call_s,
    case_s,
    compile_cost,
    dry_conv,
    hash_compile_spec,
    layer_rank,
    memory_floor_s,
    priority,
    rounds_for,
    scale_cases,
    scale_dtypes,
    time_cuda,
    tune_cost,
)
from bench.utils import alexnet_features, conv_layer_inputs, vgg11_features
from tritonslide import ops

TABLES, BITS = 3, 5
NETS = {"alexnet": alexnet_features, "vgg11": vgg11_features}
SIZES = (224, 32)
FULL_DTYPES = ("fp16", "bf16")
VARIANTS = ("unfused", "triton", "triton_atomic", "triton_channels_last")
# Each input is its own compile of the kernel (HO, WO and C are constexprs: 8 configs, ~12 s per dtype on an H100
# host): one layer, the one every quick list times (the ALSH layer file then reuses its compiles and tuning).
QUICK = ("vgg11224-conv13",)


def _cases():
    for net, build in NETS.items():
        model = build()
        for size in SIZES:
            for name, conv, shape in conv_layer_inputs(model, size):
                yield f"{net}{size}-conv{name}", conv, shape


CASES = list(_cases())


def cases_for(scale: str) -> list[tuple]:
    return scale_cases(scale, CASES, QUICK, ("dry-c16-k3@8", *dry_conv()))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    scale = bench_scale(metafunc.config)
    cases = cases_for(scale)
    metafunc.parametrize(("case", "conv", "shape"), cases, ids=[c[0] for c in cases])
    metafunc.parametrize("dtype", scale_dtypes(scale, FULL_DTYPES))
    metafunc.parametrize("variant", VARIANTS)


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


def _out_hw(conv: torch.nn.Conv2d, shape) -> tuple[int, int]:
    return tuple((shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
                 // conv.stride[i] + 1 for i in range(2))


def bench_cost(params: dict, scale: str) -> CaseCost:
    """Cost model of one test (bench/gpu.py): a new input shape compiles and tunes the kernel's configs; the
    atomic variant compiles the chosen config once more (a constexpr differs, the autotune key does not)."""
    conv, shape, dtype, variant = params["conv"], params["shape"], params["dtype"], params["variant"]
    n, c, _, _ = shape
    ho, wo = _out_hw(conv, shape)
    esize = 4 if dtype == "fp32" else 2
    x_bytes = n * c * shape[2] * shape[3] * esize
    flops = 2 * n * ho * wo * TABLES * BITS * c * conv.kernel_size[0] * conv.kernel_size[1]
    # unfused: the projection (written and read back), signs, codes and the bincount's int64 pass
    unfused_s = call_s(flops, x_bytes + n * TABLES * BITS * ho * wo * (2 * esize + 8) + n * TABLES * ho * wo * 16)
    rounds, warmup = rounds_for(scale, (ROUNDS, WARMUP))
    spec = hash_compile_spec(conv, shape, dtype)
    once = []
    if variant == "unfused":
        run = case_s(unfused_s, 2 + warmup + rounds)
    else:
        run = case_s(call_s(flops, x_bytes), 1 + warmup + rounds) + unfused_s  # + the count check
        once = [compile_cost("hash", spec), tune_cost("hash", spec)]
        if variant == "triton_atomic":
            once.append(compile_cost("hash_atomic", spec))
    order = [case[0] for case in CASES]
    return CaseCost(_group(params["case"], dtype), priority(dtype, layer=layer_rank(params["case"], QUICK, order)),
                    run, tuple(once))


def _group(case: str, dtype: str) -> str:
    return f"hash-{case}-{dtype}"


def test_hash_histogram(benchmark, bench_records, bench_device, bench_scale_name, monkeypatch, case, conv, shape,
                        dtype, variant):
    import tritonslide.kernels.hash_histogram as kernel_module

    scale = bench_scale_name
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    x = torch.randn(shape, device=bench_device, dtype=dt)
    planes = torch.randn(TABLES * BITS, shape[1], *conv.kernel_size, device=bench_device, dtype=dt)
    args = (BITS, conv.stride, conv.padding, conv.dilation)
    benchmark.group = _group(case, dtype)
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
    rounds, warmup = rounds_for(scale, (ROUNDS, WARMUP))
    timing = time_cuda(benchmark, fn, rounds=rounds, warmup=warmup, device=bench_device)
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
        "scale": scale,
        **timing,
    }
    if variant != "unfused":
        record["compare_to"] = ["unfused"]
    bench_records[benchmark.fullname] = record
