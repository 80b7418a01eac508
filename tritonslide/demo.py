"""``tritonslide demo``: the vanilla-vs-LSH experiment of CNN-SLIDE on a 3-layer CNN, small enough for a laptop CPU.

Chadha, Janardhan, Niverthi (shared/papers/000_619cf88339ee9234.txt), sec. 5: a 3-layer CNN is trained with Adam
(lr 1e-3, cross-entropy) once as the original ("vanilla") network and once with LSH filter selection in its layers,
and training time and accuracy are compared. Here the LSH variant is the hyperplane ALSH convolution of Feeney (2019,
shared/papers/001) as ``tritonslide.patch`` applies it: the first convolution stays dense, the other two become
``ALSHConv2d`` with their tables re-hashed once per epoch (thesis sec. 5.3.2) and are linked for last-active-set
sharing (Alg. 6).

Instead of MNIST (which needs a download) the data are scikit-learn's bundled handwritten digits: 1797 grayscale
images of 8x8 pixels, 10 classes. Both variants start from the same initial weights and see the batches in the same
order. Step times are what this machine measures: at these tiny shapes the hashing overhead of ALSH can outweigh the
filters it skips, and the table says so rather than hiding it.

Other methods join the comparison by adding one :class:`Variant` to :data:`VARIANTS`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import tritonslide

DEMO_INSTALL_HINT = "pip install 'tritonslide[demo]'"
# 12 epochs: dense reaches 98.0% and ALSH 95.3% test accuracy (seed 0); ALSH was at 90.2% after 8.
DEFAULT_EPOCHS = 12
DEFAULT_BATCH_SIZE = 64


class MissingDemoDependency(ImportError):
    """scikit-learn or tqdm, which only the demo needs, is not installed."""


def require_demo_dependencies() -> None:
    """Raise :class:`MissingDemoDependency` naming the missing packages and the install command."""
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("tqdm", "tqdm")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDemoDependency(
            f"tritonslide demo needs {' and '.join(missing)}, which is not installed; run: {DEMO_INSTALL_HINT}"
        )


# ---------------------------------------------------------------------- model and data
def three_layer_cnn(num_classes: int = 10) -> nn.Sequential:
    """The 3-layer CNN of CNN-SLIDE sec. 5.1 for 1x8x8 inputs (the paper gives no exact layout; this is ours).

    conv1 (1->32, 3x3, pad 1) - ReLU - conv2 (32->64, 3x3, pad 1) - ReLU - MaxPool 2 - conv3 (64->64, 3x3, pad 1) -
    ReLU - MaxPool 2 - Flatten - Linear(64*2*2 -> ``num_classes``). Between conv2 and conv3 there are only
    zero-preserving modules, so ``tritonslide.patch`` links them for last-active-set sharing.
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 32, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(32, 64, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("conv3", nn.Conv2d(64, 64, 3, padding=1)),
                ("relu3", nn.ReLU()),
                ("pool3", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(64 * 2 * 2, num_classes)),
            ]
        )
    )


@dataclass(frozen=True)
class DigitsSplit:
    """Standardized (N, 1, 8, 8) float32 images and int64 labels of a stratified train/test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_size: float = 0.25) -> DigitsSplit:
    """scikit-learn's digits, split stratified with ``seed``; pixels scaled to [0, 1] (they are 0..16), then
    standardized with the mean and std of the training pixels (one scalar each, so images keep their shape)."""
    require_demo_dependencies()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=test_size, random_state=seed, stratify=digits.target
    )
    x_train, x_test = images[idx_train], images[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return DigitsSplit((x_train - mean) / std, labels[idx_train], (x_test - mean) / std, labels[idx_test])


# ---------------------------------------------------------------------- variants
PatchFn = Callable[[nn.Module, int], nn.Module]


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: ``patch(model, steps_per_epoch)`` turns the dense model into the variant."""

    name: str
    patch: PatchFn


def _dense(model: nn.Module, steps_per_epoch: int) -> nn.Module:
    return model


def _alsh(model: nn.Module, steps_per_epoch: int) -> nn.Module:
    # The thesis re-hashed the filters once per epoch (Feeney 2019, sec. 5.3.2).
    return tritonslide.patch(model, tritonslide.ALSHConfig(rebuild_every=steps_per_epoch))


def _convs(module: nn.Module, name: str) -> bool:
    # conv2 and conv3: the first conv stays dense (as the papers do) and the 10-class head is too small to shrink
    return name in ("conv2", "conv3")


def _sketch(model: nn.Module, steps_per_epoch: int) -> nn.Module:
    # CNN-SLIDE's sketch conv (sec. 4.2): output side, 2 sketches of width 16 averaged
    config = tritonslide.SketchConfig(k=16, pairs=2, mode="output", distribution="uniform")
    return tritonslide.patch(model, config, filter_fn=_convs)


def _milf(model: nn.Module, steps_per_epoch: int) -> nn.Module:
    # CNN-SLIDE (sec. 4.3): the same sketches, ALSH-selected filters, tables re-hashed once per epoch
    sketch = tritonslide.SketchConfig(k=16, pairs=2, mode="output", distribution="uniform")
    config = tritonslide.MILFConfig(sketch=sketch, alsh=tritonslide.ALSHConfig(rebuild_every=steps_per_epoch))
    return tritonslide.patch(model, config, filter_fn=_convs)


def _lowrank(model: nn.Module, steps_per_epoch: int) -> nn.Module:
    return tritonslide.patch(model, tritonslide.LowRankConfig(rank=8, scheme="channel"), filter_fn=_convs)


def _csg(model: nn.Module, steps_per_epoch: int) -> nn.Module:
    # one generator of 16x16x3x3 slices from 128-long codes shared by conv2 and conv3 (Omidvar et al., sec. 3)
    return tritonslide.patch(model, tritonslide.CSGConfig(), filter_fn=_convs)


# The first entry is the baseline every other row's step time is compared with.
VARIANTS: list[Variant] = [
    Variant("dense", _dense),
    Variant("alsh", _alsh),
    Variant("sketch", _sketch),
    Variant("milf", _milf),
    Variant("lowrank", _lowrank),
    Variant("csg", _csg),
]


# ---------------------------------------------------------------------- training
def _active_fractions(model: nn.Module) -> dict[str, float]:
    return {name: s.active_fraction for name, s in tritonslide.stats(model).items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy of ``model`` in eval mode, in batches of ``batch_size``. ALSH / MILF layers choose their active sets
    per sample in eval by default (``ALSHConfig.selection="auto"``), so the batch size does not change predictions;
    with ``selection="batch"`` each test batch shares one set."""
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return correct / len(y)


def train(
    model: nn.Module,
    data: DigitsSplit,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool,
    desc: str = "",
) -> list[float]:
    """Train ``model`` in place: Adam, lr 1e-3, cross-entropy (CNN-SLIDE sec. 5), batches in the order that
    ``seed`` gives (the same for every model). Returns the time of every step (zero_grad, forward, backward, Adam
    step; ``time.perf_counter``)."""
    from tqdm.auto import tqdm

    n = len(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order_gen = torch.Generator().manual_seed(seed)
    step_times: list[float] = []
    bar = tqdm(total=epochs * -(-n // batch_size), desc=f"{desc:>8}", unit="step", disable=not progress)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order_gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return step_times


def train_variant(
    variant: Variant,
    init_model: nn.Module,
    data: DigitsSplit,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Train a copy of ``init_model`` turned into ``variant``; return its row of the table.

    Adam, lr 1e-3, cross-entropy (CNN-SLIDE sec. 5). A step (zero_grad, forward, backward, optimizer step) is timed
    with ``time.perf_counter``; the row holds the mean and the median over all steps. Active fractions are the
    running means of ``tritonslide.stats`` over the training forwards (``active_train``) and, after a reset, over
    the evaluation forwards (``active_eval``); both are empty for a model without ALSH layers.
    """
    steps_per_epoch = -(-len(data.y_train) // batch_size)
    model = variant.patch(copy.deepcopy(init_model), steps_per_epoch)
    step_times = train(model, data, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                       desc=variant.name)
    active_train = _active_fractions(model)
    # No re-hash before evaluating: the network co-adapts to the tables it trains with. Re-hashing the final weights
    # lowered test accuracy after 15 of 16 epoch counts (seed 0, 1-16 epochs; -13.5 to +2.0 points), e.g.
    # 94.2% -> 82.7% after 14 epochs.
    tritonslide.reset_stats(model)
    accuracy = evaluate(model, data.x_test, data.y_test, batch_size)
    return {
        "method": variant.name,
        "steps": len(step_times),
        "step_ms": 1e3 * statistics.fmean(step_times),
        "step_ms_median": 1e3 * statistics.median(step_times),
        "accuracy": accuracy,
        # trainable parameters of the model (a generator shared by CSG layers counts once)
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "active_train": active_train,
        "active_eval": _active_fractions(model),
    }


def run_demo(
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    variants: list[Variant] | None = None,
) -> list[dict[str, Any]]:
    """Train every variant (default :data:`VARIANTS`) from the same initial weights; return one row per variant.

    Each row: ``method``, ``steps``, ``step_ms`` / ``step_ms_median`` (mean / median training step time),
    ``accuracy`` (test, in [0, 1]), ``active_train`` / ``active_eval`` ({ALSH layer name: mean active fraction})
    and ``step_ratio`` (``step_ms`` over the first variant's). CNN-SLIDE sec. 5: vanilla vs LSH on the 3-layer CNN.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"run_demo: epochs must be an int >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"run_demo: batch_size must be an int >= 1, got {batch_size!r}")
    variants = VARIANTS if variants is None else variants
    data = load_digits_split(seed)
    torch.manual_seed(seed)
    init_model = three_layer_cnn()
    rows = [
        train_variant(v, init_model, data, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)
        for v in variants
    ]
    for row in rows:
        row["step_ratio"] = row["step_ms"] / rows[0]["step_ms"]
    return rows


# ---------------------------------------------------------------------- converting a trained model
CONVERT_METHODS = ("alsh", "sketch", "milf", "lowrank", "csg")


@torch.no_grad()
def _weight_error(dense: nn.Module, model: nn.Module) -> float | None:
    """Largest relative weight error ``||W' - W|| / ||W||`` over the converted layers that factor their weight
    (None for ALSH, which keeps the dense Parameters)."""
    dense_modules = dict(dense.named_modules())
    errors = [
        float((m.weight - dense_modules[name].weight).norm() / dense_modules[name].weight.norm())
        for name, m in model.named_modules()
        if tritonslide.nn.ALSHConv2d is not type(m) and getattr(type(m), "replaces", None) is not None
    ]
    return max(errors) if errors else None


def _convert_config(method: str):
    """The method's default config, except that ALSH and MILF choose their active sets per sample in training too
    (``selection="sample"``): the digits CNN has no BatchNorm, and evaluated per sample (the default in eval) the
    ALSH model fine-tuned per batch scored 87.8% against 97.1% fine-tuned per sample (README, "Per-sample active
    sets")."""
    sample = tritonslide.ALSHConfig(selection="sample")
    return {"alsh": sample, "milf": tritonslide.MILFConfig(alsh=sample)}.get(method, method)


def convert_and_finetune(
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    methods: tuple[str, ...] = CONVERT_METHODS,
) -> list[dict[str, Any]]:
    """Train the 3-layer CNN dense for ``epochs``, convert a copy with every method (``tritonslide.patch(model,
    method)``: default config and budget (ALSH / MILF: per-sample sets, :func:`_convert_config`), first conv
    dense, ``init="auto"`` fits the trained weights), and
    fine-tune each copy for as many epochs with the same optimizer (Adam, lr 1e-3) and batch order.

    One row per method (the first is ``dense``): ``accuracy_converted`` (test accuracy right after conversion),
    ``accuracy`` (after fine-tuning; dense: after training), ``output_error`` (relative error of the test logits
    right after conversion, ``||f'(x) - f(x)|| / ||f(x)||``), ``weight_error`` (largest relative weight error of a
    converted layer; None for ALSH) and ``params`` (trainable parameters).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"convert_and_finetune: epochs must be an int >= 1, got {epochs!r}")
    data = load_digits_split(seed)
    torch.manual_seed(seed)
    dense = three_layer_cnn()
    train(dense, data, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress, desc="dense")
    accuracy = evaluate(dense, data.x_test, data.y_test, batch_size)
    with torch.no_grad():
        logits = dense(data.x_test)
    rows = [{"method": "dense", "accuracy_converted": accuracy, "accuracy": accuracy, "output_error": 0.0,
             "weight_error": 0.0, "params": sum(p.numel() for p in dense.parameters())}]
    for method in methods:
        model = tritonslide.patch(copy.deepcopy(dense), _convert_config(method))
        converted = evaluate(model, data.x_test, data.y_test, batch_size)  # eval mode; batches as in training
        with torch.no_grad():
            error = float((model(data.x_test) - logits).norm() / logits.norm())
        weight_error = _weight_error(dense, model)
        train(model, data, epochs=epochs, batch_size=batch_size, seed=seed + 1, progress=progress, desc=method)
        rows.append({
            "method": method, "accuracy_converted": converted,
            "accuracy": evaluate(model, data.x_test, data.y_test, batch_size), "output_error": error,
            "weight_error": weight_error, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        })
    return rows


def format_conversion_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`convert_and_finetune`'s rows."""
    lines = ["| method | params | logit error after conversion | largest layer weight error | "
             "test acc % after conversion | after fine-tuning | vs dense (points) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense = rows[0]["accuracy"]
    for row in rows:
        weight = "-" if row["weight_error"] is None else f"{row['weight_error']:.3f}"
        lines.append(
            f"| {row['method']} | {row['params']:,} | {row['output_error']:.3f} | {weight} | "
            f"{100 * row['accuracy_converted']:.1f} | {100 * row['accuracy']:.1f} | "
            f"{100 * (row['accuracy'] - dense):+.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- report
def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per variant, one active-fraction column per ALSH layer ("-" where none)."""
    layers = list(dict.fromkeys(name for row in rows for name in row["active_train"]))
    header = ["method", "params", "step ms mean", "median", "mean vs " + rows[0]["method"], "test acc %"]
    header += [f"{name} active train/eval" for name in layers]
    lines = []
    for row in rows:
        cells = [row["method"], f"{row['params']:,}", f"{row['step_ms']:.2f}", f"{row['step_ms_median']:.2f}",
                 f"{row['step_ratio']:.2f}x"]
        cells.append(f"{100 * row['accuracy']:.2f}")
        for name in layers:
            if name in row["active_train"]:
                cells.append(f"{row['active_train'][name]:.3f} / {row['active_eval'][name]:.3f}")
            else:
                cells.append("-")
        lines.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(cells) for cells in lines]
    return "\n".join(out)


def report(rows: list[dict[str, Any]], *, epochs: int, batch_size: int, seed: int) -> str:
    """The demo's printed report: the setup, the table and the step-time ratio of each variant to the baseline."""
    base = rows[0]["method"]
    lines = [
        f"tritonslide {tritonslide.__version__} demo: 3-layer CNN on scikit-learn digits (8x8, 10 classes, "
        f"75/25 split), {epochs} epoch(s) of {rows[0]['steps'] // epochs} steps, batch {batch_size}, seed {seed}, "
        "Adam lr 1e-3",
        f"device cpu, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"tritonslide backend {tritonslide.current_backend()}",
        "step ms: time of one training step (zero_grad, forward, backward, Adam step), mean and median over all steps",
        "active train/eval: mean fraction of the layer's filters computed, over the training / test forwards",
        "",
        format_table(rows),
        "",
    ]
    for row in rows[1:]:
        median_ratio = row["step_ms_median"] / rows[0]["step_ms_median"]
        if (row["step_ratio"] > 1) != (median_ratio > 1):
            verdict = "mean and median disagree: the timings are noisy (other load on the machine?)"
        else:
            verdict = f"{row['method']} steps are {'slower' if median_ratio > 1 else 'faster'} than {base} here"
        lines.append(
            f"step-time ratio {row['method']}/{base}: {row['step_ratio']:.2f} (mean), {median_ratio:.2f} (median): "
            + verdict
        )
    return "\n".join(lines)


__all__ = [
    "CONVERT_METHODS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "VARIANTS",
    "DigitsSplit",
    "MissingDemoDependency",
    "Variant",
    "convert_and_finetune",
    "evaluate",
    "format_conversion_table",
    "format_table",
    "load_digits_split",
    "report",
    "require_demo_dependencies",
    "run_demo",
    "three_layer_cnn",
    "train",
    "train_variant",
]
