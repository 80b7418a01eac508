"""AlexNet's five convolutions on CPU: ALSH (tritonslide.patch, defaults) against nn.Conv2d in the same run.

Feeney (2019), shared/papers/001, sec. 5.3.1 / Table 5.1: batch 64 of 224x224 images, inference, the mean time
per batch; the thesis measured 2.94 s dense vs 1.83 s ALSH (1.61x) on one core with PyTorch 0.4, replacing every
convolution. Here the batch is 64 real photograph crops (scikit-learn's sample images) and, for comparison,
64 standard-normal images. Variants per input group:

- ``dense``: the ``nn.Sequential`` of torchvision's ``AlexNet.features``, default init, seed 0;
- ``alsh``: a deep copy through ``tritonslide.patch(model)`` with the defaults: the first conv stays dense, the
  other four become ALSHConv2d linked for last-active-set sharing (Alg. 6); hashing is inside the timed call;
- ``alsh_all``: every conv replaced (``filter_fn=lambda m, n: True``), as in Table 5.1.

Nothing here asserts a time: the ratio dense_mean / alsh_mean and the active fractions are printed at the end of
the run and merged into ``bench/results/cpu.json`` (see conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

import tritonslide
from bench.utils import OtherLoad, alexnet_features, quantiles, random_normal_batch, sample_crops

BATCH = 64
SIZE = 224
# One warmup and a few rounds keep the whole file under ~1 min on a 2-core CPU (a dense batch takes ~0.35 s).
ROUNDS = 7
WARMUP = 1

VARIANTS = {
    "dense": None,
    "alsh": {},
    "alsh_all": {"filter_fn": lambda module, name: True},
}
INPUTS = {"sample_crops": sample_crops, "random_normal": random_normal_batch}
CASES = [(inputs, variant) for inputs in INPUTS for variant in VARIANTS]


@pytest.fixture(scope="module")
def dense_model() -> torch.nn.Sequential:
    return alexnet_features(seed=0).eval()


@pytest.fixture(scope="module")
def models(dense_model: torch.nn.Sequential) -> dict[str, torch.nn.Module]:
    out: dict[str, torch.nn.Module] = {}
    for variant, kwargs in VARIANTS.items():
        out[variant] = dense_model if kwargs is None else tritonslide.patch(copy.deepcopy(dense_model), **kwargs).eval()
    return out


@pytest.fixture(scope="module")
def batches() -> dict[str, torch.Tensor]:
    return {name: make(BATCH, SIZE, seed=0) for name, make in INPUTS.items()}


@pytest.mark.parametrize(("inputs", "variant"), CASES, ids=[f"{i}-{v}" for i, v in CASES])
def test_alexnet_features(benchmark, bench_records, models, batches, inputs: str, variant: str) -> None:
    model, x = models[variant], batches[inputs]
    benchmark.group = f"alexnet-features-b{BATCH}-{SIZE}px-fp32-{inputs}"
    tritonslide.reset_stats(model)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    with OtherLoad() as load:
        y = benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert y.shape == (BATCH, 256, 6, 6)

    layer_stats = tritonslide.stats(model)
    active = {name: s.active_fraction for name, s in layer_stats.items()}
    if variant != "dense":
        assert len(active) == (4 if variant == "alsh" else 5)
        assert all(0.0 < f <= 1.0 for f in active.values())
    benchmark.extra_info["active_fraction"] = active
    benchmark.extra_info["other_cpu_load"] = load.value
    if benchmark.stats is None or not benchmark.stats.stats.data:  # --benchmark-disable: nothing was timed
        return
    data = list(benchmark.stats.stats.data)
    p20, p50, p80 = quantiles(data)
    bench_records[benchmark.fullname] = {
        "group": benchmark.group,
        "variant": variant,
        "inputs": inputs,
        "shape": [BATCH, 3, SIZE, SIZE],
        "dtype": "float32",
        "mode": "inference",
        "config": None if variant == "dense" else tritonslide.ALSHConfig().to_dict(),
        "rounds": len(data),
        "warmup_rounds": WARMUP,
        "mean_s": sum(data) / len(data),
        "min_s": min(data),
        "p20_s": p20,
        "p50_s": p50,
        "p80_s": p80,
        "times_s": data,
        "active_fraction": active,
        "mean_active_fraction": sum(active.values()) / len(active) if active else None,
        "other_cpu_load": load.value,
    }
