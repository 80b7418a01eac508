"""GPU benchmark of the active-filter convolution (kernels/active_conv2d.py), issue #5.

    python -m pytest bench/test_active_conv2d_gpu.py --benchmark-only [-k "alexnet and bf16"]

Every conv of AlexNet and VGG-11 (torchvision layer settings, batch 64, 224x224 and 32x32 images; the input shapes
come from ``bench.utils.conv_layer_inputs``, VGG's repeated 512->512 conv at the same resolution is timed once),
bf16 and fp32, forward (under ``no_grad``) and forward + backward (dx, dW, db through ``torch.autograd.grad``; no
dx for the 3-channel first conv, whose input is the image), at active fractions 1.0, 0.5 and 0.25 of the output
filters and, as with last-active-set sharing (Feeney 2019, Alg. 6), of the input channels (all 3 channels of the
first conv). The index sets are random sorted subsets (seeded). Variants, timed in the same run per group:

- ``dense``: ``F.conv2d`` (cuDNN) on all filters and channels;
- ``torch_best``: ``tritonslide.ops.active_conv2d`` on the torch backend: gather the active weight rows / input
  channels, cuDNN on the smaller convolution, scatter into the full-size output (cpu_fallback/active_conv2d.py);
- ``triton``: the same op on the Triton backend (gathers inside the kernels, implicit im2col).

Records (bench/results/<gpu>.json) carry ``ratio_vs`` (baseline p50 / this p50) against ``dense`` and, for
``triton``, ``torch_best``; the issue's targets: at fraction 0.5 forward time <= 0.6x of dense (ratio >= 1.67), never
slower than torch_best (ratio >= 1), at fraction 1.0 within 1.25x of dense (ratio >= 0.8). fp32 runs with TF32 on
for both cuDNN and ``tl.dot`` (``allow_tf32`` flags set for the test, recorded as ``tf32``), so that the
comparison is of equal arithmetic. The Triton record also stores the max relative error of its output (and dW)
against torch_best, and the test fails when it is not small: a wrong kernel has no meaningful time.

Cost: 24 layer shapes x 2 dtypes x 3 fractions x 2 passes x 3 variants = 864 timings of WARMUP + ROUNDS calls,
plus Triton's compiling and autotuning (each new shape key tunes each kernel over its config list). Expect 10-15
minutes for the whole file on an H100; run it in parts (``-k alexnet``, ``-k "vgg11224"``, ``-k "vgg1132"``) where
one command is limited to 10 minutes. Skipped without CUDA. Nothing here asserts a time.

Scales (``--bench-scale``, bench/gpu.py): ``full`` as above (864 tests). ``quick``: AlexNet conv3 (192->384 @13)
and VGG-11's 512->512 conv @28, both 3x3 / stride 1 / padding 1 with sizes that are not multiples of 16, so that
Triton compiles each kernel once per dtype for both (AlexNet conv2's 5x5, VGG's 112-px conv would each add 20
compiles per dtype, ~30 s on an H100 host); fp16 and bf16, both passes, fractions 1 / 0.5 / 0.25, all three
variants: 2 x 2 x 3 x 2 x 3 = 72 tests. Estimate on an H100 with a cold Triton cache (bench/gpu.py's model):
2 dtypes x (7 + 7 + 6) configs = 40 compiles x 1.5 s = 60 s; 12 autotune keys per kernel (layer x fraction x dtype)
x 20 configs x 0.15 s = 36 s; 72 tests of 12-17 calls of 0.05-3 ms plus overhead, 11 s; the groups' host-side
inputs, 5 s: about 1.9 min. ``dry``: one 16->16 3x3 conv on 2 x 16 x 8 x 8, fp16 and fp32, on the CPU in Triton's
interpreter with the same variants, passes and fractions: 36 tests.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

import tritonslide
from bench.gpu import (
    CPU_RANDN_S,
    DTYPES,
    CaseCost,
    active_compile_spec,
    bench_scale,
    call_s,
    case_s,
    compile_cost,
    dry_conv,
    layer_rank,
    priority,
    rounds_for,
    scale_cases,
    scale_dtypes,
    synchronize,
    time_cuda,
    tune_cost,
)
from bench.utils import alexnet_features, conv_layer_inputs, vgg11_features
from tritonslide import ops

NETS = {"alexnet": alexnet_features, "vgg11": vgg11_features}
SIZES = (224, 32)
FULL_DTYPES = ("bf16", "fp32")
FRACTIONS = (1.0, 0.5, 0.25)
PASSES = ("forward", "forward+backward")
VARIANTS = ("dense", "torch_best", "triton")
# One kernel specialization for both (see the module docstring): 3x3, stride 1, padding 1, H and W not multiples
# of 16. AlexNet conv3 (192->384 @13, 14 GFLOP at batch 64) and VGG-11's conv 512->512 @28 (237 GFLOP).
QUICK = ("alexnet224-conv6", "vgg11224-conv13")
COMPARE_TO = {"dense": [], "torch_best": ["dense"], "triton": ["dense", "torch_best"]}
# 864 timings: 20 rounds (after 3 warmup calls, the first of which compiles / autotunes) keep the whole file within
# 10-15 minutes while the p20-p80 spread of a 1-30 ms call stays a few percent on a quiet GPU.
ROUNDS, WARMUP = 20, 3
# Relative error of the Triton output against the torch path above which the timing is not recorded as valid:
# bf16 rounding of outputs of O(1) is 2**-8; fp32 runs TF32 (10-bit mantissa) in both.
MAX_REL_ERR = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-2}


def _conv_geometry(conv: torch.nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)


def _cases():
    for net, build in NETS.items():
        model = build()
        for size in SIZES:
            seen = set()
            for name, conv, shape in conv_layer_inputs(model, size):
                key = (_conv_geometry(conv), shape)
                if key in seen:  # VGG-11's two 512->512 convs at one resolution: same work, timed once
                    continue
                seen.add(key)
                yield f"{net}{size}-conv{name}", conv, shape


CASES = list(_cases())


def cases_for(scale: str) -> list[tuple]:
    return scale_cases(scale, CASES, QUICK, ("dry-c16o16-k3@8", *dry_conv()))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    scale = bench_scale(metafunc.config)
    cases = cases_for(scale)
    metafunc.parametrize(("case", "conv", "shape"), cases, ids=[c[0] for c in cases])
    metafunc.parametrize("dtype", scale_dtypes(scale, FULL_DTYPES))
    metafunc.parametrize("fraction", FRACTIONS)
    metafunc.parametrize("pass_", PASSES)
    metafunc.parametrize("variant", VARIANTS)


def _out_hw(conv: torch.nn.Conv2d, shape) -> tuple[int, int]:
    return tuple((shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
                 // conv.stride[i] + 1 for i in range(2))


def _group(case: str, dtype: str, pass_: str, fraction: float) -> str:
    return f"active_conv2d-{case}-{dtype}-{pass_}-f{fraction}"


def bench_cost(params: dict, scale: str) -> CaseCost:
    """Cost model of one test (bench/gpu.py): FLOPs of the pass at the active fraction, the Triton variant's
    compiles (per specialization) and autotune keys (per layer, fraction and dtype), the group's host-side inputs."""
    case, conv, shape = params["case"], params["conv"], params["shape"]
    dtype, fraction, pass_, variant = params["dtype"], params["fraction"], params["pass_"], params["variant"]
    n, c, h, w_ = shape
    o = conv.out_channels
    ho, wo = _out_hw(conv, shape)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    backward = pass_ == "forward+backward"
    out_act = max(1, round(o * fraction))
    in_act = c if c <= 3 else max(1, round(c * fraction))
    esize = 4 if dtype == "fp32" else 2
    dense = 2 * n * ho * wo * o * c * taps
    gemms = (3 if c > 3 else 2) if backward else 1  # forward, dX (not for the image), dW
    out_bytes = n * o * ho * wo * esize
    if variant == "dense":
        flops, nbytes = dense, out_bytes
    else:
        flops = dense * (out_act / o) * (in_act / c)
        # the torch path writes the full-size output twice (zero fill, scatter); the kernels once
        nbytes = out_bytes * (2 if variant == "torch_best" else 1)
    one = call_s(flops * gemms, nbytes * gemms)
    rounds, warmup = rounds_for(scale, (ROUNDS, WARMUP))
    calls = rounds + warmup
    once = [(f"inputs:{_group(case, dtype, pass_, fraction)}", (n * c * h * w_ + (n * o * ho * wo if backward else 0))
             * CPU_RANDN_S)]
    if variant == "triton":
        calls += 5 if backward else 2  # the checks against the torch path (that path's calls counted alike)
        spec = active_compile_spec(conv, shape, dtype)
        key = f"{case}|f{fraction}|{dtype}"
        kernels = ["active_fwd"] + (["active_dx"] if backward and c > 3 else []) + (["active_dw"] if backward else [])
        for kernel in kernels:
            once += [compile_cost(kernel, spec), tune_cost(kernel, key)]
    order = [case_[0] for case_ in CASES]
    rank = priority(dtype, pass_, fraction, layer_rank(case, QUICK, order))
    return CaseCost(_group(case, dtype, pass_, fraction), rank, case_s(one, calls), tuple(once))


@lru_cache(maxsize=1)
def _host_inputs(shape: tuple, o: int, out_hw: tuple, fraction: float, backward: bool):
    """x, the active output / input index sets and grad_y of a group, drawn on the host from one seeded generator
    (in that order); cached for the group's variants, which run one after the other (a VGG input and its grad_y
    are 75 M elements: ~1 s of torch.randn per test otherwise)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    out_idx = _subset(o, fraction, gen)
    in_idx = _subset(shape[1], fraction, gen) if shape[1] > 3 else None  # the image has no active-channel set
    grad_y = torch.randn(shape[0], o, *out_hw, generator=gen) if backward else None
    return x, out_idx, in_idx, grad_y


def _subset(n: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    k = max(1, round(n * frac))
    return torch.randperm(n, generator=gen)[:k].sort().values


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.fixture
def tf32_for():
    """Set TF32 for cuDNN and tl.dot / cuBLAS alike for an fp32 case (restored after the test).

    Not monkeypatch: its undo deletes the attribute of torch.backends.cuda.matmul instead of restoring it."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    def set_for(dtype: torch.dtype) -> bool:
        on = dtype == torch.float32
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        return on

    yield set_for
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_active_conv2d(benchmark, bench_records, bench_device, bench_scale_name, tf32_for, case, conv, shape, dtype,
                       fraction, pass_, variant):
    torch_dtype = DTYPES[dtype]
    device = bench_device
    tf32 = tf32_for(torch_dtype) and device.type == "cuda"
    n, c, h, w_ = shape
    o = conv.out_channels
    stride, padding, dilation = conv.stride, conv.padding, conv.dilation
    backward = pass_ == "forward+backward"
    ho, wo = _out_hw(conv, shape)
    x, out_idx, in_idx, grad_y = _host_inputs(tuple(shape), o, (ho, wo), fraction, backward)
    # copies: on the CPU (dry) .to() of a tensor already there would hand out the cached one itself
    x = x.to(device, torch_dtype, copy=True)
    weight = conv.weight.detach().to(device, torch_dtype, copy=True)
    bias = conv.bias.detach().to(device, torch_dtype, copy=True)
    out_idx = out_idx.to(device)
    in_idx = in_idx.to(device) if in_idx is not None else None
    # dx only where a previous layer exists; the weight and bias always train
    x.requires_grad_(backward and c > 3)
    weight.requires_grad_(backward)
    bias.requires_grad_(backward)
    leaves = [t for t in (x, weight, bias) if t.requires_grad]
    grad_y = grad_y.to(device, torch_dtype) if backward else None

    def active(backend: str) -> torch.Tensor:
        with tritonslide.use_backend(backend):
            return ops.active_conv2d(x, weight, bias, out_idx, in_idx, stride, padding, dilation)

    def forward() -> torch.Tensor:
        if variant == "dense":
            return F.conv2d(x, weight, bias, stride, padding, dilation)
        return active("torch" if variant == "torch_best" else "triton")

    if backward:
        def fn():
            return torch.autograd.grad(forward(), leaves, grad_y)
    else:
        def fn():
            with torch.no_grad():
                return forward()

    errors = {}
    if variant == "triton":  # correctness first, against the torch path of the same op (cuDNN on the gathers)
        with torch.no_grad():
            errors["y_rel_err"] = _rel_err(active("triton"), active("torch"))
        if backward:
            g_triton = torch.autograd.grad(active("triton"), leaves, grad_y)
            g_torch = torch.autograd.grad(active("torch"), leaves, grad_y)
            errors["dw_rel_err"] = _rel_err(g_triton[-2], g_torch[-2])
        synchronize(device)

    benchmark.group = _group(case, dtype, pass_, fraction)
    rounds, warmup = rounds_for(bench_scale_name, (ROUNDS, WARMUP))
    timing = time_cuda(benchmark, fn, rounds=rounds, warmup=warmup, device=device)
    record = {
        "group": benchmark.group,
        "variant": variant,
        "compare_to": COMPARE_TO[variant],
        **timing,
        "op": "active_conv2d",
        "layer": case,
        "shape": list(shape),
        "weight_shape": list(weight.shape),
        "stride": list(stride),
        "padding": list(padding),
        "dilation": list(dilation),
        "dtype": dtype,
        "tf32": tf32,
        "fraction": fraction,
        "active_out": int(out_idx.numel()),
        "active_in": c if in_idx is None else int(in_idx.numel()),
        "pass": pass_,
        "memory_format": "nchw",
        "scale": bench_scale_name,
        **errors,
    }
    if variant == "triton":
        from tritonslide.kernels import active_conv2d as kernel_module

        # the tuned configs of this shape (the autotuners keep the last one chosen)
        kernels = [kernel_module._active_conv2d_fwd_kernel]
        if x.requires_grad:
            kernels.append(kernel_module._active_conv2d_bwd_dx_kernel)
        if backward:
            kernels.append(kernel_module._active_conv2d_bwd_dw_kernel)
        record["autotune"] = {k.fn.__name__: str(getattr(k, "best_config", None)) for k in kernels}
    bench_records[benchmark.fullname] = record
    for label, err in errors.items():
        assert err < MAX_REL_ERR[torch_dtype], f"{case} {dtype} f{fraction}: Triton {label} = {err:.3g}"
