"""Pieces every section of ``tritonslide compare`` shares: the offline data, the CNNs of CNN-SLIDE sec. 5, training,
timing and output helpers."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tritonslide.demo import DigitsSplit, evaluate, load_digits_split, train  # noqa: F401 - re-exported for sections

COMPARE_INSTALL_HINT = "pip install 'tritonslide[demo]'"


def require_dependencies() -> None:
    """scikit-learn (the digits), tqdm, matplotlib and pytest-benchmark: one clear error naming the extra."""
    import importlib.util

    missing = [pkg for mod, pkg in (("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib"),
                                    ("pytest_benchmark", "pytest-benchmark")) if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(f"tritonslide compare needs {', '.join(missing)}: {COMPARE_INSTALL_HINT}")


def digits28(seed: int = 0) -> DigitsSplit:
    """scikit-learn's 8x8 digits upscaled to 28x28 (bilinear), the MNIST stand-in that ships offline: 1,347 training
    and 450 test images, standardized with the training pixels' mean and std (one scalar each)."""
    d = load_digits_split(seed)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)

    x_train, x_test = up(d.x_train), up(d.x_test)
    mean, std = x_train.mean(), x_train.std()
    return DigitsSplit((x_train - mean) / std, d.y_train, (x_test - mean) / std, d.y_test)


def _block(layers: list[tuple[str, nn.Module]], i: int, cin: int, cout: int, pool: bool,
           batch_norm: bool = False) -> None:
    if batch_norm:  # conv without bias, BatchNorm, ReLU, as in ResNet / VGG-BN
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False)), (f"bn{i}", nn.BatchNorm2d(cout))]
    else:
        layers.append((f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1)))
    layers.append((f"relu{i}", nn.ReLU()))
    if pool:
        layers.append((f"pool{i}", nn.MaxPool2d(2)))


def _cnn(widths: Sequence[int], pools: Sequence[bool], hidden: int | None, num_classes: int,
         size: int, batch_norm: bool = False) -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    cin = 1
    for i, (w, p) in enumerate(zip(widths, pools), start=1):
        _block(layers, i, cin, w, p, batch_norm)
        cin = w
        size //= 2 if p else 1
    layers.append(("flatten", nn.Flatten()))
    if hidden:
        layers += [("fc1", nn.Linear(cin * size * size, hidden)), ("relu_fc", nn.ReLU()),
                   ("fc2", nn.Linear(hidden, num_classes))]
    else:
        layers.append(("fc", nn.Linear(cin * size * size, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def cnn3(num_classes: int = 10, size: int = 28) -> nn.Sequential:
    """CNN-SLIDE's 3-layer CNN for 1x28x28 inputs (the paper gives no layout; ours): 3x3 convs 32-64-64, pools after
    the second and third, one linear layer."""
    return _cnn((32, 64, 64), (False, True, True), None, num_classes, size)


def cnn3_bn(num_classes: int = 10, size: int = 28) -> nn.Sequential:
    """:func:`cnn3` with a BatchNorm after each convolution (and no conv bias): the BatchNorm part of the
    ``selection`` section (ALSH on conv2 / conv3, each followed by its BatchNorm)."""
    return _cnn((32, 64, 64), (False, True, True), None, num_classes, size, batch_norm=True)


def cnn8(num_classes: int = 10, size: int = 28) -> nn.Sequential:
    """CNN-SLIDE's 8-layer CNN (ours): six 3x3 convs 32-32-64-64-128-128, a pool after every second, two linear."""
    return _cnn((32, 32, 64, 64, 128, 128), (False, True, False, True, False, True), 128, num_classes, size)


def vgg_style(num_classes: int = 10, size: int = 28) -> nn.Sequential:
    """A VGG-style net for 28x28 (CNN-SLIDE's "VGG-10" scaled down; ours): 3x3 convs 64-64 | 128-128 | 256-256-256
    with pools between the stages, two linear layers (10 weight layers)."""
    return _cnn((64, 64, 128, 128, 256, 256, 256), (False, True, False, True, False, False, True), 256,
                num_classes, size)


NETS: dict[str, Callable[..., nn.Sequential]] = {"cnn3": cnn3, "cnn8": cnn8, "vgg_style": vgg_style}


def time_fn(fn: Callable[[], Any], rounds: int, warmup: int = 1) -> dict[str, Any]:
    """pytest-benchmark's timer and statistics (``tritonslide._benchtools.time_calls``), on the CPU or the GPU."""
    from tritonslide._benchtools import time_calls

    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    return time_calls(fn, rounds=rounds, warmup=warmup, synchronize=sync)


def time_round_robin(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """:func:`time_fn` for several functions, one call of each per round (``_benchtools.time_interleaved``)."""
    from tritonslide._benchtools import time_interleaved

    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    return time_interleaved(fns, rounds=rounds, warmup=warmup, synchronize=sync)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_plot(fig: Any, out_dir: Path, name: str) -> str:
    """Write a matplotlib figure as ``out_dir/name`` (PNG, 120 dpi), close it, return ``name``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=120)
    plt.close(fig)
    return name


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def param_count(model: nn.Module) -> int:
    """Trainable parameters (a generator shared by CSG layers counts once: ``parameters()`` deduplicates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
