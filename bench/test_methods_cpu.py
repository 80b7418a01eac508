"""Every tritonslide method as a single conv layer on CPU, against nn.Conv2d in the same run.

Shapes: a VGG-style layer (Conv2d(256, 256, 3, padding=1), input (8, 256, 56, 56)) and the five convolutions of
AlexNet (``bench.utils.alexnet_features``, seed 0) as single layers at batch 64 with their real input shapes. Each
method layer is built by ``from_dense`` from a copy of the dense conv (PyTorch's default init, fixed seed: the
layers are untrained). Modes: ``inference`` (``eval()``, ``torch.inference_mode()``) and ``train`` (one training
step: forward, then backward of ``y.square().mean()`` w.r.t. the input and the parameters; gradients are set to
None before every round, outside the timed call).

Inputs: conv1 gets 64 real photograph crops (``sample_crops``); the other layers get ``relu(randn)`` inputs, since
in a network they read ReLU outputs and the ALSH/MILF active sets depend on the input statistics.

Per (method, shape) the end-of-run summary (conftest.py) prints the time ratio dense_mean / method_mean of the
same group, the parameter ratio dense / method (``param_count()``), the output error
``||y_method - y_dense||_F / ||y_dense||_F`` on the same input (inference) and, for ALSH/MILF, the active fraction;
the records are merged into ``bench/results/cpu.json`` and rendered as a markdown table (``methods_markdown``).
Nothing here asserts a time.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from torch import nn

import tritonslide
from bench.utils import OtherLoad, alexnet_features, quantiles, sample_crops
from tritonslide.nn import ALSHConv2d, CSGConv2d, LowRankConv2d, MILFConv2d, SketchConv2d

# One warmup and 3 rounds: the slowest group (AlexNet conv2, training step) takes ~1 s a round for dense on
# 2 quiet cores; with 7 layers x 2 modes x 7 variants this keeps the file within a few minutes.
ROUNDS = 3
WARMUP = 1
SEED = 0


def _vgg_conv() -> nn.Conv2d:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        return nn.Conv2d(256, 256, kernel_size=3, padding=1)
    finally:
        torch.random.set_rng_state(gen_state)


def _alexnet_conv(index: int) -> Callable[[], nn.Conv2d]:
    return lambda: alexnet_features(seed=SEED)[index]


def _relu_normal(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(SEED)).relu_()


# name -> (dense conv factory, input factory, input description)
SHAPES: dict[str, tuple[Callable[[], nn.Conv2d], Callable[[], torch.Tensor], str]] = {
    "vgg256-b8-56px": (_vgg_conv, _relu_normal(8, 256, 56, 56), "relu(randn)"),
    "alexnet-conv1-b64": (_alexnet_conv(0), lambda: sample_crops(64, 224, seed=SEED), "sample_crops"),
    "alexnet-conv2-b64": (_alexnet_conv(3), _relu_normal(64, 64, 27, 27), "relu(randn)"),
    "alexnet-conv3-b64": (_alexnet_conv(6), _relu_normal(64, 192, 13, 13), "relu(randn)"),
    "alexnet-conv4-b64": (_alexnet_conv(8), _relu_normal(64, 384, 13, 13), "relu(randn)"),
    "alexnet-conv5-b64": (_alexnet_conv(10), _relu_normal(64, 256, 13, 13), "relu(randn)"),
}

# variant -> (layer class, config); "dense" is the nn.Conv2d itself.
VARIANTS: dict[str, tuple[type, Any] | None] = {
    "dense": None,
    "alsh": (ALSHConv2d, tritonslide.ALSHConfig()),
    "sketch": (SketchConv2d, tritonslide.SketchConfig()),
    "milf": (MILFConv2d, tritonslide.MILFConfig()),
    "lowrank-channel-r8": (LowRankConv2d, tritonslide.LowRankConfig(rank=8, scheme="channel")),
    "lowrank-filter-r1": (LowRankConv2d, tritonslide.LowRankConfig(rank=1, scheme="filter")),
    "csg": (CSGConv2d, tritonslide.CSGConfig()),
}
MODES = ("inference", "train")
# (shape, mode, variant) combinations left out to keep the run short; each is recorded as "n/a" with this reason.
SKIP: dict[tuple[str, str, str], str] = {}

# Dense first in every group so the baseline and the methods are timed next to each other.
CASES = [(s, m, v) for s in SHAPES for m in MODES for v in VARIANTS]


def _param_count(layer: nn.Module) -> int:
    if hasattr(layer, "param_count"):
        return int(layer.param_count())
    return sum(p.numel() for p in layer.parameters())


class _Cache:
    """Dense convs, inputs, method layers and output errors, built once per module run (lazily, per shape)."""

    def __init__(self) -> None:
        self.dense: dict[str, nn.Conv2d] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.layers: dict[tuple[str, str], nn.Module | str] = {}
        self.errors: dict[tuple[str, str], float] = {}

    def dense_conv(self, shape: str) -> nn.Conv2d:
        if shape not in self.dense:
            self.dense[shape] = SHAPES[shape][0]()
        return self.dense[shape]

    def input(self, shape: str) -> torch.Tensor:
        if shape not in self.inputs:
            self.inputs[shape] = SHAPES[shape][1]().contiguous()
        return self.inputs[shape]

    def layer(self, shape: str, variant: str) -> nn.Module | str:
        """The layer, or the reason it cannot be built (a string)."""
        key = (shape, variant)
        if key not in self.layers:
            dense = self.dense_conv(shape)
            spec = VARIANTS[variant]
            if spec is None:
                self.layers[key] = dense
            else:
                cls, config = spec
                try:
                    # A copy: from_dense may reuse the dense Parameters (ALSH, the biases).
                    self.layers[key] = cls.from_dense(copy.deepcopy(dense), config, name=shape)
                except (ValueError, TypeError, NotImplementedError) as exc:
                    self.layers[key] = f"{type(exc).__name__}: {exc}"
        return self.layers[key]

    def output_error(self, shape: str, variant: str) -> float:
        key = (shape, variant)
        if key not in self.errors:
            layer, dense, x = self.layer(shape, variant), self.dense_conv(shape), self.input(shape)
            assert isinstance(layer, nn.Module)
            layer.eval()
            dense.eval()
            with torch.inference_mode():
                y_ref = dense(x)
                y = layer(x)
            self.errors[key] = float(torch.linalg.vector_norm(y - y_ref) / torch.linalg.vector_norm(y_ref))
            tritonslide.reset_stats(layer)
        return self.errors[key]


@pytest.fixture(scope="module")
def cache() -> _Cache:
    return _Cache()


def _config_dict(variant: str) -> dict[str, Any] | None:
    spec = VARIANTS[variant]
    return None if spec is None else spec[1].to_dict()


@pytest.mark.parametrize(("shape", "mode", "variant"), CASES, ids=[f"{s}-{m}-{v}" for s, m, v in CASES])
def test_method_layer(benchmark, bench_records, cache: _Cache, shape: str, mode: str, variant: str) -> None:
    benchmark.group = f"methods-{shape}-fp32-{mode}"
    dense, x = cache.dense_conv(shape), cache.input(shape)
    base = {
        "group": benchmark.group,
        "variant": variant,
        "method": variant.split("-")[0],
        "layer": shape,
        "inputs": SHAPES[shape][2],
        "shape": list(x.shape),
        "conv": {"in": dense.in_channels, "out": dense.out_channels, "kernel": list(dense.kernel_size),
                 "stride": list(dense.stride), "padding": list(dense.padding)},
        "dtype": "float32",
        "mode": mode,
        "config": _config_dict(variant),
    }
    layer = cache.layer(shape, variant)
    reason = SKIP.get((shape, mode, variant)) or (layer if isinstance(layer, str) else None)
    if reason is not None:
        bench_records[benchmark.fullname] = {**base, "not_available": reason}
        pytest.skip(reason)
    assert isinstance(layer, nn.Module)

    dense_params = _param_count(dense)
    params = _param_count(layer)
    error = 0.0 if variant == "dense" else cache.output_error(shape, variant)
    tritonslide.reset_stats(layer)

    if mode == "inference":
        layer.eval()

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return layer(x)

        setup = None
    else:
        layer.train()
        x_train = x.detach().clone().requires_grad_(True)

        def step() -> torch.Tensor:
            y = layer(x_train)
            y.square().mean().backward()
            return y

        def setup() -> None:  # untimed: gradients of the previous round are dropped
            layer.zero_grad(set_to_none=True)
            x_train.grad = None

    with OtherLoad() as load:
        if setup is None:
            y = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        else:
            y = benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert y.shape[:2] == (x.shape[0], dense.out_channels)
    if mode == "train":
        assert x_train.grad is not None and torch.isfinite(x_train.grad).all()

    active = {name or "layer": s.active_fraction for name, s in tritonslide.stats(layer).items()}
    benchmark.extra_info.update(other_cpu_load=load.value, active_fraction=active, output_error=error)
    if benchmark.stats is None or not benchmark.stats.stats.data:  # --benchmark-disable: nothing was timed
        return
    data = list(benchmark.stats.stats.data)
    p20, p50, p80 = quantiles(data)
    bench_records[benchmark.fullname] = {
        **base,
        "rounds": len(data),
        "warmup_rounds": WARMUP,
        "mean_s": sum(data) / len(data),
        "min_s": min(data),
        "p20_s": p20,
        "p50_s": p50,
        "p80_s": p80,
        "times_s": data,
        "param_count": params,
        "dense_param_count": dense_params,
        "param_ratio": dense_params / params,
        "output_error": error,
        "active_fraction": active,
        "mean_active_fraction": sum(active.values()) / len(active) if active else None,
        "other_cpu_load": load.value,
    }
    if variant == "csg":  # the generator is shared by every CSG layer of a model: counted apart, as the paper does
        bench_records[benchmark.fullname]["generator_param_count"] = layer.generator_param_count()
