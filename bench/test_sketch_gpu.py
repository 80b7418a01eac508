"""GPU benchmark of the fused sketch chains (kernels/sketch.py), issue #6.

    python -m pytest bench/test_sketch_gpu.py --benchmark-only

Layers, batch 64, bf16 (NCHW):

- VGG-11 (torchvision configuration "A", 224x224 images): the convs 64->128 @112, 256->256 @56, 512->512 @28 and
  512->512 @14 (of the other four, conv 18 repeats conv 16 and convs 6 / 11 differ from 8 / 13 in one channel
  count only: left out to keep the run short);
- AlexNet convs 2-5 (64->192 k5 @27, 192->384 @13, 384->256 @13, 256->256 @13, 224x224 images);
- a 4096x4096 linear layer (AlexNet / VGG classifier) on 64 rows.

The first conv of each network (3 input channels) is left out: there d = 3 and d/16 < 1. ``r`` is d/16, d/8 and
d/4 with d = min(in, out) of the layer (in / out channels for a conv, features for the linear layer), the sketch
width of a SketchConv2d with ``k * pairs = r``.

Two modes: ``fwd`` (inference, ``torch.no_grad``) and ``fwd_bwd`` (forward and the backward of a SketchConv2d /
SketchLinear of mode "output" in the middle of a network: gradients for x, A (the trainable sketch), bias; B is the
fixed random matrix and gets none). Variants timed in the same run:

- ``two_step``: ``tritonslide.ops`` on the torch backend (cuDNN conv to r channels, then the 1x1 conv / matmul);
- ``dense``: ``F.conv2d`` / ``F.linear`` (cuDNN / cuBLAS) with the reconstructed weight B @ A as a leaf, i.e. the
  layer the sketch replaces (its backward computes dx, dW, db);
- ``triton``: ``tritonslide.ops`` on the Triton backend; its record stores ``ratio_vs`` both baselines.

Targets (issue #6): ``ratio_vs["two_step"] >= 1.3``; ``ratio_vs["dense"] > 1`` whenever r <= d/4. panther's SK
layer (the third baseline the issue names if it can run) is not benchmarked: the GPU machine has no package
registry, so panther cannot be installed there. Skipped without CUDA; nothing here asserts a time. Each case is
compiled and autotuned by an untimed first call; 20 rounds after 5 warmups keep the whole file to a few minutes.

Scales (``--bench-scale``, bench/gpu.py): ``full`` as above, bf16 (27 cases x 2 modes x 3 variants = 162 tests).
``quick``: VGG-11's 512->512 conv @28 at r = d/8 = 64 and AlexNet conv3 (192->384 @13) at r = d/4 = 48, fp16 and
bf16, both modes, all three variants: 24 tests. The two share every compile (3x3, r tile 64, r / channels / sizes
alike in divisibility by 16): 2 dtypes x 15 configs. ``dry``: one 16->16 3x3 conv on 2 x 16 x 8 x 8 at r = d/4 = 4,
fp16 and fp32, on the CPU in Triton's interpreter: 12 tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritonslide
from bench.gpu import (
    DTYPES,
    CaseCost,
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
    time_cuda,
    tune_cost,
)
from bench.utils import alexnet_features, conv_layer_inputs, vgg11_features
from tritonslide import ops

BATCH = 64
FULL_DTYPES = ("bf16",)
ROUNDS, WARMUP = 20, 5
VGG_LAYERS = {"3", "8", "13", "16"}  # indices in vgg11().features: 64->128, 256->256, 512->512 @28, 512->512 @14
VARIANTS = ("two_step", "dense", "triton")
MODES = ("fwd", "fwd_bwd")


def _conv_cases():
    for net, build, keep in (("vgg11", vgg11_features, VGG_LAYERS), ("alexnet", alexnet_features, None)):
        for name, conv, shape in conv_layer_inputs(build(), 224, BATCH):
            if conv.in_channels < 16 or (keep is not None and name not in keep):
                continue
            yield f"{net}-conv{name}", conv, shape


def _cases():
    cases = []
    for case, conv, shape in _conv_cases():
        d = min(conv.in_channels, conv.out_channels)
        for div in (16, 8, 4):
            cases.append((case, "conv", shape, conv, d // div, d))
    for div in (16, 8, 4):
        cases.append(("linear-4096x4096", "linear", (BATCH, 4096), None, 4096 // div, 4096))
    return cases


CASES = _cases()
# (case, r) of the quick list: one kernel specialization for both (see the module docstring)
QUICK = (("vgg11-conv13", 64), ("alexnet-conv6", 48))


def _case_id(case: tuple) -> str:
    return f"{case[0]}-r{case[4]}"


def cases_for(scale: str) -> list[tuple]:
    conv, shape = dry_conv()
    return scale_cases(scale, CASES, QUICK, ("dry-c16o16-k3@8", "conv", shape, conv, 4, 16),
                       quick_id=lambda c: (c[0], c[4]))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    scale = bench_scale(metafunc.config)
    cases = cases_for(scale)
    # the dtype joins the case: full (bf16 only) keeps today's test names, the other scales add it
    dtypes = scale_dtypes(scale, FULL_DTYPES)
    params = [(*c, dt) for c in cases for dt in dtypes]
    ids = [_case_id(c) + ("" if scale == "full" else f"-{dt}") for c in cases for dt in dtypes]
    metafunc.parametrize(("case", "kind", "shape", "conv", "r", "d", "dtype"), params, ids=ids)
    metafunc.parametrize("mode", MODES)
    metafunc.parametrize("variant", VARIANTS)


def _group(case: str, r: int, mode: str, dtype: str, scale: str) -> str:
    # full keeps its names (bf16 only); the other scales name the dtype
    return f"sketch-{case}-r{r}-{mode}" + ("" if scale == "full" else f"-{dtype}")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def bench_cost(params: dict, scale: str) -> CaseCost:
    """Cost model of one test (bench/gpu.py): FLOPs of the variant, the Triton variant's compiles (per geometry,
    r tile, divisibility by 16 of r / channels / sizes, dtype) and autotune keys (per case and dtype)."""
    case, kind, shape, conv, r = params["case"], params["kind"], params["shape"], params["conv"], params["r"]
    dtype, mode, variant = params["dtype"], params["mode"], params["variant"]
    if kind == "conv":
        n, c, h, w = shape
        ho, wo = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1, \
            (w + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        o, fan = conv.out_channels, c * conv.kernel_size[0] * conv.kernel_size[1]
        rows = n * ho * wo
        geometry = f"k{conv.kernel_size}s{conv.stride}p{conv.padding}|c16={c % 16 == 0}|hw16={h % 16 == 0}"
    else:
        rows, fan, o = shape[0], shape[1], 4096
        geometry = "linear"
    esize = 4 if dtype == "fp32" else 2
    if variant == "dense":
        flops = 2 * rows * o * fan
    else:
        flops = 2 * rows * r * (fan + o)
    passes = 3 if mode == "fwd_bwd" else 1
    one = call_s(flops * passes, rows * o * esize * passes)
    rounds, warmup = rounds_for(scale, (ROUNDS, WARMUP))
    calls = 1 + warmup + rounds + (1 if mode == "fwd_bwd" else 0)  # first call; grad_y's shape from one more
    once = []
    if variant == "triton":
        calls += 1 if mode == "fwd" else 0  # the check against the torch chain
        spec = f"{geometry}|R{_pow2(max(r, 16))}|r16={r % 16 == 0}|{dtype}"
        key = f"{case}|r{r}|{dtype}"
        if kind == "conv":
            kernels = ["sketch_fwd"] + (["sketch_dz", "sketch_db", "sketch_da", "sketch_dx"] if mode == "fwd_bwd"
                                        else [])
        else:
            kernels = ["sketch_linear_fwd"] + (["sketch_linear_bwd"] if mode == "fwd_bwd" else [])
        for kernel in kernels:
            once += [compile_cost(kernel, spec), tune_cost(kernel, key)]
    quick = [f"{c}-r{r_}" for c, r_ in QUICK]
    rank = priority(dtype, "forward" if mode == "fwd" else "forward+backward", None,
                    layer_rank(f"{case}-r{r}", quick, [_case_id(c) for c in CASES]))
    return CaseCost(_group(case, r, mode, dtype, scale), rank, case_s(one, calls), tuple(once))


def _make(kind, shape, conv, r, dtype=torch.bfloat16, device="cuda"):
    """x, A, B, bias and the op / dense functions of one case, on ``device`` in ``dtype``; A is scaled so that
    B @ A has the default init's magnitude (the kernels' speed does not depend on it, the sanity check's error
    does)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    if kind == "conv":
        o, fan = conv.out_channels, (conv.in_channels, *conv.kernel_size)
        geometry = (conv.stride, conv.padding, conv.dilation)
    else:
        o, fan, geometry = 4096, (4096,), ()
    fan_in = 1
    for f in fan:
        fan_in *= f
    a = torch.randn(r, *fan, device=device, dtype=dtype, generator=gen) / fan_in**0.5
    b = (torch.randint(0, 2, (o, r), device=device, generator=gen).to(dtype) * 2 - 1) / r**0.5
    bias = torch.randn(o, device=device, dtype=dtype, generator=gen) / fan_in**0.5
    w = (b.float() @ a.flatten(1).float()).to(dtype).view(o, *fan)
    if kind == "conv":
        def op(x, a, b, bias):
            return ops.sketch_conv2d(x, a, b, bias, None, *geometry)

        def dense(x, w, bias):
            return F.conv2d(x, w, bias, *geometry)
    else:
        def op(x, a, b, bias):
            return ops.sketch_linear(x, a, b, bias)

        dense = F.linear
    return x, a, b, bias, w, op, dense


def _step(variant, mode, x, a, b, bias, w, op, dense):
    """The function timed: forward only, or forward + torch.autograd.grad (no .grad accumulation)."""
    if variant == "dense":
        leaves, call = (x, w, bias), dense
    else:
        leaves, call = (x, a, b, bias), op
    backend = "torch" if variant == "two_step" else "triton"

    def run(*args):
        if variant == "dense":
            return call(*args)
        with tritonslide.use_backend(backend):
            return call(*args)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return run(*leaves)
        return fn
    # mode "output" layer: x (a hidden activation), A and bias trainable; B fixed. Dense: x, W, bias.
    wanted = [t.detach().requires_grad_(t is not b) for t in leaves]
    grad_y = torch.randn_like(run(*[t.detach() for t in leaves]))

    def fn():
        y = run(*wanted)
        return torch.autograd.grad(y, [t for t in wanted if t.requires_grad], grad_y)
    return fn


def test_sketch(benchmark, bench_records, bench_device, bench_scale_name, case, kind, shape, conv, r, d, dtype, mode,
                variant):
    torch.manual_seed(0)
    x, a, b, bias, w, op, dense = _make(kind, shape, conv, r, DTYPES[dtype], bench_device)
    benchmark.group = _group(case, r, mode, dtype, bench_scale_name)
    fn = _step(variant, mode, x, a, b, bias, w, op, dense)
    out = fn()  # first call: compile + autotune, untimed
    if variant == "triton" and mode == "fwd":  # sanity: the same layer as the torch chain, to bf16 accuracy
        with torch.no_grad(), tritonslide.use_backend("torch"):
            ref = op(x, a, b, bias).float()
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 2e-2, f"relative error {err:.3g} against the torch chain"
    del out
    rounds, warmup = rounds_for(bench_scale_name, (ROUNDS, WARMUP))
    timing = time_cuda(benchmark, fn, rounds=rounds, warmup=warmup, device=bench_device)
    if not timing:
        return
    record = {
        "group": benchmark.group,
        "variant": variant,
        "case": case,
        "kind": kind,
        "mode": mode,
        "input_shape": list(shape),
        "r": r,
        "d": d,
        "r_over_d": r / d,
        "dtype": dtype,
        "scale": bench_scale_name,
        **timing,
    }
    if kind == "conv":
        record.update(out_channels=conv.out_channels, kernel=list(conv.kernel_size), stride=list(conv.stride),
                      padding=list(conv.padding))
    if variant == "triton":
        record["compare_to"] = ["two_step", "dense"]
    bench_records[benchmark.fullname] = record
