"""Helpers of the CPU benchmarks: the AlexNet feature extractor, real image crops, and the result record.

A benchmark records a ratio against its baseline measured in the same run, with the device, versions, commit,
timestamp and p20/p50/p80 (STYLE.md practice 7; the record follows Liger-Kernel's benchmark/scripts/utils.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tritonslide import models

# The environment, the machine load and the quantiles live in the package (``tritonslide bench`` records them too,
# and bench/ is not installed); re-exported here for the bench/ scripts.
from tritonslide._benchtools import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OtherLoad,
    cpu_model,
    environment,
    quantiles,
    sample_crops,
)
from tritonslide._benchtools import git_commit as _git_commit

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent


__all__ = [
    "BENCH_DIR", "IMAGENET_MEAN", "IMAGENET_STD", "REPO_ROOT", "RESULTS_DIR", "OtherLoad", "alexnet_features",
    "conv_layer_inputs", "cpu_model", "environment", "git_commit", "methods_markdown", "methods_rows", "quantiles",
    "random_normal_batch", "sample_crops", "update_results", "vgg11_features",
]


def git_commit() -> str:
    """HEAD's hash of this checkout, with ``-dirty`` when the working tree has changes; ``unknown`` without git."""
    return _git_commit(REPO_ROOT) or "unknown"


def alexnet_features(seed: int = 0) -> nn.Sequential:
    """torchvision's ``AlexNet.features`` (the five convolutions of AlexNet, ``tritonslide.models.alexnet``),
    default PyTorch init, fixed seed (the features are drawn first, so they do not depend on the classifier)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return models.alexnet().features
    finally:
        torch.random.set_rng_state(gen_state)


def vgg11_features(seed: int = 0) -> nn.Sequential:
    """torchvision's ``vgg11().features`` (configuration "A": eight 3x3 convs), default PyTorch init, fixed seed."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        channels = 3
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(gen_state)


def conv_layer_inputs(model: nn.Module, size: int, batch: int = 64) -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """``(name, conv, input shape)`` of every ``nn.Conv2d`` of ``model`` for a (batch, 3, size, size) input.

    Shapes come from one forward pass on the meta device (no memory, no compute). A model too deep for a small
    input (AlexNet's last max-pool at 32x32) stops after its last convolution; that is not an error here."""
    shapes: dict[str, tuple[int, ...]] = {}
    meta = copy.deepcopy(model).to("meta")
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: shapes.__setitem__(name, tuple(args[0].shape)))
             for name, m in meta.named_modules() if isinstance(m, nn.Conv2d)]
    n_convs = len(hooks)
    try:
        meta(torch.empty(batch, 3, size, size, device="meta"))
    except RuntimeError:
        if len(shapes) < n_convs:
            raise
    finally:
        for h in hooks:
            h.remove()
    convs = dict(model.named_modules())
    return [(name, convs[name], shape) for name, shape in shapes.items()]



def random_normal_batch(n: int = 64, size: int = 224, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) standard-normal inputs: the comparison point for :func:`sample_crops`."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def update_results(path: Path, records: dict[str, dict[str, Any]]) -> None:
    """Merge ``records`` (keyed by benchmark name) into the JSON file at ``path``: same names are replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
    data.update(records)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def methods_rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per non-dense record of ``test_methods_cpu.py`` (those with a ``layer`` key), in run order.

    Time ratio: dense_mean / method_mean of the same group (the conftest summary stores it as ``speedup_mean``);
    param ratio: dense / method parameters; ``n/a`` rows carry their reason.
    """
    rows = []
    for rec in records.values():
        if "layer" not in rec or rec.get("variant") == "dense":
            continue
        rows.append({
            "method": rec["variant"],
            "layer": rec["layer"],
            "mode": rec["mode"],
            "time_ratio": rec.get("speedup_mean"),
            "param_ratio": rec.get("param_ratio"),
            "output_error": rec.get("output_error"),
            "active_fraction": rec.get("mean_active_fraction"),
            "not_available": rec.get("not_available"),
            "busy": (rec.get("pair_other_cpu_load") or 0.0) > 0.05,
        })
    return rows


def methods_markdown(records: dict[str, dict[str, Any]]) -> str:
    """Render the method records (e.g. ``json.load(open("bench/results/cpu.json"))``) as a markdown table.

    A time ratio marked ``*`` was measured while other processes used more than 5% of the CPUs.
    """
    header = ["method", "layer", "mode", "time dense/method", "params dense/method", "output error",
              "active fraction"]
    lines = []
    for r in methods_rows(records):
        if r["not_available"] is not None:
            lines.append([r["method"], r["layer"], r["mode"], "n/a", "n/a", "n/a", "n/a"])
            continue
        time = "n/a" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x" + ("*" if r["busy"] else "")
        active = "" if r["active_fraction"] is None else f"{r['active_fraction']:.3f}"
        lines.append([r["method"], r["layer"], r["mode"], time, f"{r['param_ratio']:.1f}x",
                      f"{r['output_error']:.3f}", active])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])
