"""GPU benchmark of whole ALSH layers on the Triton kernels, and the cost of reading the active-set size on the host.

    python -m pytest bench/test_alsh_layer_gpu.py --benchmark-only

An ``ALSHConv2d`` (thesis defaults: L=3, K=5, top 5 buckets) built from every conv of AlexNet and VGG-11 at
224x224, batch 64, bf16, in eval mode; one call = hash + histogram (kernel of issue #4), selection
(``ops.alsh_active_set``), the active-filter GEMM (issue #5). Variants timed in the same run:

- ``dense``: the ``nn.Conv2d`` (cuDNN);
- ``alsh``: the layer as it runs unlinked: the active set stays on the device as an index buffer and a count that
  the GEMM kernel reads, so the host never waits;
- ``alsh_sync``: the same layer taking the exact set ``idx[:count]`` first, as linked layers do (the count is read
  on the host: one device-to-host synchronization per layer and call).

``ratio_vs["alsh_sync"]`` of the ``alsh`` record is the price of that synchronization (the issue asks for it).
Skipped without CUDA. Nothing here asserts a time.
"""

from __future__ import annotations

import pytest
import torch

import tritonslide
from bench.gpu import time_cuda
from bench.utils import alexnet_features, conv_layer_inputs, vgg11_features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

NETS = {"alexnet": alexnet_features, "vgg11": vgg11_features}
VARIANTS = ("dense", "alsh", "alsh_sync")
CASES = [(f"{net}224-conv{name}", conv, shape) for net, build in NETS.items()
         for name, conv, shape in conv_layer_inputs(build(), 224)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("case", "conv", "shape"), CASES, ids=[c[0] for c in CASES])
def test_alsh_layer(benchmark, bench_records, case, conv, shape, variant):
    torch.manual_seed(0)
    dense = conv.to(device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    benchmark.group = f"alsh-layer-{case}-bf16"
    if variant == "dense":
        layer = dense
    else:
        layer = tritonslide.nn.ALSHConv2d.from_dense(dense, tritonslide.ALSHConfig(), name=case).eval()
        # _publish is what linking sets: the layer then materializes the exact set (reading its size on the host)
        layer._publish = variant == "alsh_sync"

    def fn():
        with torch.no_grad():
            return layer(x)

    fn()  # compile + autotune, untimed
    timing = time_cuda(benchmark, fn)
    if not timing:
        return
    record = {"group": benchmark.group, "variant": variant, "case": case, "input_shape": list(shape),
              "dtype": "bf16", **timing}
    if variant != "dense":
        layer._publish = False
        record["compare_to"] = ["dense", "alsh_sync"] if variant == "alsh" else ["dense"]
        record["active_fraction"] = layer.stats().active_fraction
    bench_records[benchmark.fullname] = record
