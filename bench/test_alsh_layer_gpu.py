"""GPU benchmark of whole ALSH layers on the Triton kernels, and the cost of reading the active-set size on the host.

    python -m pytest bench/test_alsh_layer_gpu.py --benchmark-only [--bench-scale quick|dry]

An ``ALSHConv2d`` (thesis defaults: L=3, K=5, top 5 buckets) built from every conv of AlexNet and VGG-11 at
224x224, batch 64, bf16, in eval mode; one call = hash + histogram (kernel of issue #4), selection
(``ops.alsh_active_set``), the active-filter GEMM (issue #5). Variants timed in the same run:

- ``dense``: the ``nn.Conv2d`` (cuDNN);
- ``alsh``: the layer as it runs unlinked: the active set stays on the device as an index buffer and a count that
  the GEMM kernel reads, so the host never waits;
- ``alsh_sync``: the same layer taking the exact set ``idx[:count]`` first, as linked layers do (the count is read
  on the host: one device-to-host synchronization per layer and call);
- ``alsh_sample``: one active set per sample (``ALSHConfig.selection``, issue #15; what eval runs by default):
  per-sample histograms, (N, O) index rows, the per-sample GEMM (kernels/sample_conv2d.py).

``alsh`` and ``alsh_sync`` choose per batch (``selection="batch"``), as the thesis does.

``ratio_vs["alsh_sync"]`` of the ``alsh`` record is the price of that synchronization (the issue asks for it).
Skipped without CUDA. Nothing here asserts a time.

Scales (``--bench-scale``, bench/gpu.py): ``full`` as above (13 layers x 4 variants = 52 tests, the default
backend). ``quick``: VGG-11's 512->512 conv @28, the layer of the hash file's quick list (whose compiles and
autotune keys the layer's hashing reuses), fp16 and bf16: 8 tests. ``dry``: one 16->16 3x3 layer on 2 x 16 x 8 x 8,
fp16 and fp32, on the CPU with the backend forced to ``triton`` (the default takes the torch path on CPU tensors),
the kernels in Triton's interpreter: 8 tests.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

import tritonslide
from bench.gpu import (
    DTYPES,
    ROUNDS,
    WARMUP,
    CaseCost,
    active_compile_spec,
    bench_scale,
    call_s,
    case_s,
    compile_cost,
    dry_conv,
    hash_compile_spec,
    layer_rank,
    priority,
    rounds_for,
    scale_cases,
    scale_dtypes,
    time_cuda,
    tune_cost,
)
from bench.utils import alexnet_features, conv_layer_inputs, vgg11_features

NETS = {"alexnet": alexnet_features, "vgg11": vgg11_features}
FULL_DTYPES = ("bf16",)
VARIANTS = ("dense", "alsh", "alsh_sync", "alsh_sample")
CASES = [(f"{net}224-conv{name}", conv, shape) for net, build in NETS.items()
         for name, conv, shape in conv_layer_inputs(build(), 224)]
# one layer: each dtype compiles the GEMM twice (with the device-side count, and for the exact set), ~21 s
QUICK = ("vgg11224-conv13",)
# Share of the filters an ALSH layer keeps, for the cost model: 0.34-0.54 per layer on AlexNet (bench/README.md)
ACTIVE_FRACTION = 0.5


def cases_for(scale: str) -> list[tuple]:
    return scale_cases(scale, CASES, QUICK, ("dry-c16o16-k3@8", *dry_conv()))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    scale = bench_scale(metafunc.config)
    cases = cases_for(scale)
    # the dtype joins the case: full (bf16 only) keeps today's test names, the other scales add it
    dtypes = scale_dtypes(scale, FULL_DTYPES)
    params = [(*c, dt) for c in cases for dt in dtypes]
    ids = [c[0] + ("" if scale == "full" else f"-{dt}") for c in cases for dt in dtypes]
    metafunc.parametrize(("case", "conv", "shape", "dtype"), params, ids=ids)
    metafunc.parametrize("variant", VARIANTS)


def _group(case: str, dtype: str) -> str:
    return f"alsh-layer-{case}-{dtype}"


def bench_cost(params: dict, scale: str) -> CaseCost:
    """Cost model of one test (bench/gpu.py): the hash kernel's compiles and autotune key are those of the hash
    file for the same input (shared when both run); the GEMM compiles once with the device-side count and once
    for the exact set (its size, an integer argument, is rarely a multiple of 16 as the active conv file's are)."""
    case, conv, shape, dtype, variant = params["case"], params["conv"], params["shape"], params["dtype"], \
        params["variant"]
    n, c, h, w = shape
    ho = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
    dense = 2 * n * ho * wo * conv.out_channels * c * conv.kernel_size[0] * conv.kernel_size[1]
    esize = 4 if dtype == "fp32" else 2
    x_bytes, y_bytes = n * c * h * w * esize, n * conv.out_channels * ho * wo * esize
    once = []
    if variant == "dense":
        one = call_s(dense, x_bytes + y_bytes)
    else:
        one = call_s(dense * ACTIVE_FRACTION, 2 * x_bytes + y_bytes) + 3 * call_s()  # hash, selection, GEMM
        spec = hash_compile_spec(conv, shape, dtype)
        gemm = active_compile_spec(conv, shape, dtype)
        once = [compile_cost("hash", spec), tune_cost("hash", spec)]
        if variant == "alsh":
            once += [compile_cost("active_fwd", gemm + "|count"), tune_cost("active_fwd", f"{case}|count|{dtype}")]
        elif variant == "alsh_sample":
            once += [compile_cost("sample_fwd", gemm), tune_cost("sample_fwd", f"{case}|{dtype}")]
        else:
            once += [compile_cost("active_fwd", gemm + "|exact"), tune_cost("active_fwd", f"{case}|exact|{dtype}")]
    rounds, warmup = rounds_for(scale, (ROUNDS, WARMUP))
    rank = priority(dtype, layer=layer_rank(case, QUICK, [c[0] for c in CASES]))
    return CaseCost(_group(case, dtype), rank, case_s(one, 1 + warmup + rounds), tuple(once))


def test_alsh_layer(benchmark, bench_records, bench_device, bench_scale_name, case, conv, shape, dtype, variant):
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    # a copy: the cases' convs are shared by the dtypes of a run
    dense = copy.deepcopy(conv).to(device=bench_device, dtype=dt).eval()
    x = torch.randn(shape, device=bench_device, dtype=dt)
    benchmark.group = _group(case, dtype)
    if variant == "dense":
        layer = dense
    else:
        selection = "sample" if variant == "alsh_sample" else "batch"
        layer = tritonslide.nn.ALSHConv2d.from_dense(dense, tritonslide.ALSHConfig(selection=selection),
                                                     name=case).eval()
        # _publish is what linking sets: the layer then materializes the exact set (reading its size on the host)
        layer._publish = variant == "alsh_sync"
    # dry: on CPU tensors the default backend takes the torch path, so the kernels are forced (they run in the
    # interpreter); on CUDA the layer runs as users run it
    backend = "triton" if bench_scale_name == "dry" else tritonslide.current_backend()

    def fn():
        with torch.no_grad(), (tritonslide.use_backend(backend) if bench_scale_name == "dry" else nullcontext()):
            return layer(x)

    fn()  # compile + autotune, untimed
    rounds, warmup = rounds_for(bench_scale_name, (ROUNDS, WARMUP))
    timing = time_cuda(benchmark, fn, rounds=rounds, warmup=warmup, device=bench_device)
    if not timing:
        return
    record = {"group": benchmark.group, "variant": variant, "case": case, "input_shape": list(shape),
              "dtype": dtype, "backend": backend, "scale": bench_scale_name, **timing}
    if variant != "dense":
        layer._publish = False
        record["compare_to"] = {"alsh": ["dense", "alsh_sync", "alsh_sample"]}.get(variant, ["dense"])
        record["active_fraction"] = layer.stats().active_fraction
    bench_records[benchmark.fullname] = record
