"""The cost of ImputedBatchNorm2d in a model: ALSH with plain BatchNorm after its layers (``batchnorm="keep"``)
against ALSH with the imputing one (``"impute"``, the default), and the dense model, in the same run.

Models (``tritonslide.models``, seed 0, 10 classes): ResNet-56 at 32 px, batch 64, and ResNet-18 at 112 px, batch
32, patched with ``ALSHConfig(seed=0)`` (the defaults: every conv but the first, per-batch sets in training, per-sample
in eval). Modes: ``train`` (one step: zero_grad, forward, cross-entropy on fixed labels, backward; no optimizer step,
so every round sees the same weights) and ``inference`` (``eval()``, ``torch.inference_mode()``). Inputs:
standard-normal images (seed 0).

The end-of-run summary (conftest.py) prints, per group, each variant's p50 ratio against ``dense`` and, for
``alsh_impute``, against ``alsh_keep`` (the imputation's cost); the records go to ``bench/results/cpu.json``.
Nothing here asserts a time.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import tritonslide
from bench.utils import OtherLoad, quantiles

ROUNDS = 5
WARMUP = 1
MODELS = {"resnet56": (32, 64), "resnet18": (112, 32)}  # name: (input side, batch)
VARIANTS = ("dense", "alsh_keep", "alsh_impute")
MODES = ("train", "inference")
CASES = [(m, mode, v) for m in MODELS for mode in MODES for v in VARIANTS]


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, torch.nn.Module]]:
    out = {}
    for name in MODELS:
        torch.manual_seed(0)
        dense = tritonslide.models.get_model(name, num_classes=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out[name] = {
                "dense": dense,
                "alsh_keep": tritonslide.patch(copy.deepcopy(dense), tritonslide.ALSHConfig(seed=0), batchnorm="keep"),
                "alsh_impute": tritonslide.patch(copy.deepcopy(dense), tritonslide.ALSHConfig(seed=0)),
            }
    return out


@pytest.mark.parametrize(("name", "mode", "variant"), CASES, ids=[f"{m}-{d}-{v}" for m, d, v in CASES])
def test_batchnorm_cost(benchmark, bench_records, built, name: str, mode: str, variant: str) -> None:
    side, batch = MODELS[name]
    model = built[name][variant]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=gen)
    target = torch.randint(0, 10, (batch,), generator=gen)
    benchmark.group = f"batchnorm-{name}-b{batch}-{side}px-{mode}"

    def train_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        return loss

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    model.train(mode == "train")
    with OtherLoad() as load:
        out = benchmark.pedantic(train_step if mode == "train" else forward, rounds=ROUNDS, warmup_rounds=WARMUP,
                                 iterations=1)
    assert torch.isfinite(out).all()
    if benchmark.stats is None or not benchmark.stats.stats.data:  # --benchmark-disable: nothing was timed
        return
    data = list(benchmark.stats.stats.data)
    p20, p50, p80 = quantiles(data)
    bench_records[benchmark.fullname] = {
        "group": benchmark.group, "variant": variant, "model": name, "mode": mode, "shape": [batch, 3, side, side],
        "dtype": "float32", "config": None if variant == "dense" else tritonslide.ALSHConfig(seed=0).to_dict(),
        "batchnorm": {"dense": None, "alsh_keep": "keep", "alsh_impute": "impute"}[variant],
        "rounds": len(data), "warmup_rounds": WARMUP, "mean_s": sum(data) / len(data), "min_s": min(data),
        "p20_s": p20, "p50_s": p50, "p80_s": p80, "times_s": data, "other_cpu_load": load.value,
        "compare_to": [] if variant == "dense" else ["dense"] + (["alsh_keep"] if variant == "alsh_impute" else []),
    }
