"""``cnnslide``: CNN-SLIDE's four-variant experiment (Chadha, Janardhan, Niverthi, shared/papers/000, sec. 5, Fig. 3/4).

Vanilla (dense), LSH (ALSH filter selection, sec. 4.1), sketch (sketch conv, sec. 4.2) and LSH+sketch (MILF, sec. 4.3)
are trained on each network from the same initial weights and in the same batch order (Adam, lr 1e-3,
cross-entropy, as sec. 5), and each variant's training time per epoch and test accuracy are compared with the
vanilla network's. The variants are patched as ``tritonslide demo`` patches them: ALSH with its tables re-hashed
once per epoch (``rebuild_every`` = steps per epoch), the sketch conv with 2 sketches of width 16 on the output side
and uniform random matrices, MILF with the same sketches and ALSH selection (``demo._alsh`` / ``_sketch`` /
``_milf``). Which convolutions are converted follows sec. 5.1 where it says: every even conv of the 8-layer CNN
(conv2, conv4, conv6); the 3-layer CNN keeps its first conv dense (as the demo and the other papers do; CNN-SLIDE
replaced every layer); for the VGG-style net the paper does not say, and we convert its even convs as for the 8-layer
CNN. A layer whose sketch would hold as many parameters as the dense one stays dense (``tritonslide.patch`` warns;
the notes say which).

Data: ``digits28`` (scikit-learn's digits upscaled to 28x28), the offline stand-in for MNIST. Scales
(:data:`QUICK`, :data:`FULL`, module-level so tests can shrink them):

* quick: the 3-layer and the 8-layer CNN, 2 epochs over the first 960 training images (the split is already
  shuffled), batch 64: 30 steps per variant. On an idle 2-core CPU the median steps (cnn3 0.07-0.14 s, cnn8
  0.13-0.18 s over the four variants) make that ~32 s of training steps for the section, plus evaluation and setup;
  under other processes' load it takes longer (the section reports their share of the CPUs). The VGG-style net runs
  in ``--full`` only: on that CPU a training step of it took 0.69 s dense and 2.2 s (LSH) to 4.0 s (sketch) with
  the CPU backend, minutes per epoch for the four variants.
* full: all three networks, 10 epochs (the paper's count) over all 1,347 training images: ~40 minutes on that
  CPU by the step times above (not run end to end), most of it the VGG-style net's LSH and sketch variants.

Time per epoch is the median training step (zero_grad, forward, backward, Adam step) times the steps per epoch on
the CPU, where other processes make single steps slow (the median ignores them); the sum of all step times per
epoch (which includes ALSH's once-per-epoch re-hash) is stored and shown beside it. On a GPU, where the steps are
not synchronized, the primary time is the synchronized wall time of the training loop per epoch.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import tritonslide
from tritonslide._registry import is_tritonslide_layer
from tritonslide.compare import Context, Section
from tritonslide.compare._common import (
    NETS,
    DigitsSplit,
    digits28,
    evaluate,
    markdown_table,
    param_count,
    pyplot,
    save_plot,
    train,
)


@dataclass(frozen=True)
class Scale:
    """How much of the experiment one scale runs. ``train_subset`` / ``test_subset``: the first n images of the
    split (None: all of them; the split is shuffled with the seed, so the first n are a random n)."""

    nets: tuple[str, ...]
    epochs: int
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 64


# quick: 2 x 15 steps of cnn3 + cnn8: ~32 s of steps on an idle 2-core CPU (median steps: cnn3 0.07-0.14 s, cnn8
# 0.13-0.18 s per variant); the VGG-style net (0.69-4.0 s per step) would not fit the section's 45 s. 2 x 10 steps
# left ALSH's cnn8 at chance (10.2%, seed 0).
QUICK = Scale(nets=("cnn3", "cnn8"), epochs=2, train_subset=960)
FULL = Scale(nets=("cnn3", "cnn8", "vgg_style"), epochs=10)

# report order; the first is the baseline of every ratio
VARIANTS: tuple[str, ...] = ("vanilla", "lsh", "sketch", "lsh+sketch")
METHOD = {"vanilla": "dense", "lsh": "alsh", "sketch": "sketch", "lsh+sketch": "milf"}
# the convolutions each variant converts, per network (sec. 5.1: every even layer of the 8-layer CNN)
LAYERS: dict[str, tuple[str, ...]] = {
    "cnn3": ("conv2", "conv3"),
    "cnn8": ("conv2", "conv4", "conv6"),
    "vgg_style": ("conv2", "conv4", "conv6"),
}
# tritonslide demo's sketch conv (demo._sketch / demo._milf): CNN-SLIDE sec. 4.2, s = 2 sketches of width k = 16.
# init: the demo's "auto" resolves to "scratch" on a fresh model; saying so skips that test (0.5-1.8 s a patch here).
DEMO_SKETCH = tritonslide.SketchConfig(k=16, pairs=2, mode="output", distribution="uniform", init="scratch")

PAPER_SOURCE = "Chadha, Janardhan, Niverthi, CNN-SLIDE (shared/papers/000_619cf88339ee9234.txt)"
# The paper's figures. Fig. 3 (training time) and Fig. 4 (accuracy) are plots: the text gives no value per network,
# only the summary of sec. 6 / 7 and the abstract's AlexNet figures, quoted here as written.
PAPER: list[dict[str, Any]] = [
    {"figure": "training time, LSH+sketch vs vanilla", "value": "about 30% less, for each of the networks",
     "time_ratio": 0.70, "source": "sec. 6 (Fig. 3), sec. 7"},
    {"figure": "training time, LSH+sketch vs sketch or LSH alone", "value": "about 15% less",
     "source": "sec. 6 (Fig. 3)"},
    {"figure": "accuracy, sketch or LSH alone vs vanilla", "value": "about 2-3% lower, with all architectures",
     "points": [-3.0, -2.0], "source": "sec. 6 (Fig. 4)"},
    {"figure": "accuracy, LSH+sketch vs vanilla", "value": "about 5% lower", "points": -5.0,
     "source": "sec. 6 (Fig. 4), sec. 7"},
    {"figure": "AlexNet, LSH+sketch", "value": "~29% training time speedup versus filter pruning or sketching "
     "unilaterally; ~5% training accuracy decrease", "source": "abstract"},
    {"figure": "setting", "value": "CIFAR-10 and MNIST; 3-layer CNN (every layer replaced), AlexNet, 8-layer CNN "
     "(every even layer replaced), 10-layer VGG; 10 epochs, Adam, lr 1e-3, cross-entropy, A100 GPU",
     "source": "sec. 5, 5.1"},
]
for _fig in PAPER:
    _fig["paper"] = PAPER_SOURCE
# the paper's columns of the per-run table, per variant
PAPER_TIME = {"vanilla": "1 (baseline)", "lsh": "~15% above LSH+sketch", "sketch": "~15% above LSH+sketch",
              "lsh+sketch": "~0.70x (~30% less)"}
PAPER_POINTS = {"vanilla": "0 (baseline)", "lsh": "~-2 to -3", "sketch": "~-2 to -3", "lsh+sketch": "~-5"}


# ---------------------------------------------------------------------------------------------------- helpers
# (csg.py uses these too)
def subset(data: DigitsSplit, n_train: int | None, n_test: int | None, device: torch.device) -> DigitsSplit:
    """The first ``n_train`` / ``n_test`` images (None: all) of each split, on ``device``."""
    tr, te = slice(None, n_train), slice(None, n_test)
    return DigitsSplit(data.x_train[tr].to(device), data.y_train[tr].to(device), data.x_test[te].to(device),
                       data.y_test[te].to(device))


def train_timed(model: nn.Module, data: DigitsSplit, *, epochs: int, batch_size: int, ctx: Context,
                desc: str) -> dict[str, Any]:
    """Train ``model`` in place with :func:`tritonslide.demo.train` (Adam lr 1e-3, batch order from ``ctx.seed``) and
    return its timings: ``step_ms_median`` / ``step_ms_mean``, ``epoch_s_median`` (median step x steps per epoch),
    ``epoch_s_sum`` (all steps / epochs), ``epoch_s_wall`` (the loop's synchronized wall time / epochs), ``epoch_s``
    (the primary one: median-based on the CPU, wall on a GPU, ``timing`` says which) and ``other_cpu_load`` (the
    share of the CPUs other processes used meanwhile)."""
    from tritonslide._benchtools import OtherLoad

    cuda = ctx.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with OtherLoad() as load:
        sync()
        start = time.perf_counter()
        steps = train(model, data, epochs=epochs, batch_size=batch_size, seed=ctx.seed, progress=ctx.progress,
                      desc=desc)
        sync()
        wall = time.perf_counter() - start
    per_epoch = math.ceil(len(data.y_train) / batch_size)
    median = statistics.median(steps)
    out = {
        "steps": len(steps), "steps_per_epoch": per_epoch,
        "step_ms_median": 1e3 * median, "step_ms_mean": 1e3 * statistics.fmean(steps),
        "epoch_s_median": median * per_epoch, "epoch_s_sum": sum(steps) / epochs, "epoch_s_wall": wall / epochs,
        "other_cpu_load": load.value,
    }
    out["epoch_s"] = out["epoch_s_wall"] if cuda else out["epoch_s_median"]
    out["timing"] = "synchronized wall time / epochs" if cuda else "median step x steps per epoch"
    return out


def converted_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and is_tritonslide_layer(m)]


def patch_variant(model: nn.Module, variant: str, layers: tuple[str, ...], steps_per_epoch: int) -> nn.Module:
    """``model`` turned into ``variant`` in place, converting the convolutions named in ``layers``: the configs of
    ``tritonslide demo`` (ALSH re-hashed once per epoch; sketch conv k=16, 2 sketches, output side, uniform)."""
    if variant == "vanilla":
        return model
    # the thesis re-hashed once per epoch (5.3.2); CNN-SLIDE, like the thesis, chose one active set per batch
    alsh = tritonslide.ALSHConfig(rebuild_every=steps_per_epoch, selection="batch")
    config = {"lsh": alsh, "sketch": DEMO_SKETCH,
              "lsh+sketch": tritonslide.MILFConfig(sketch=DEMO_SKETCH, alsh=alsh)}[variant]
    return tritonslide.patch(model, config, filter_fn=lambda module, name: name in layers)


def _active_fraction(model: nn.Module) -> float | None:
    fractions = [s.active_fraction for s in tritonslide.stats(model).values()]
    return statistics.fmean(fractions) if fractions else None


def run_net(net: str, data: DigitsSplit, scale: Scale, ctx: Context) -> tuple[list[dict[str, Any]], list[str]]:
    """The four variants of ``net`` from one initial model; returns the rows and the patch warnings."""
    torch.manual_seed(ctx.seed)
    init = NETS[net]().to(ctx.device)
    per_epoch = math.ceil(len(data.y_train) / scale.batch_size)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for variant in VARIANTS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = patch_variant(copy.deepcopy(init), variant, LAYERS[net], per_epoch)
        notes += [f"{net} {variant}: {w.message}" for w in caught]
        times = train_timed(model, data, epochs=scale.epochs, batch_size=scale.batch_size, ctx=ctx,
                            desc=f"{net} {variant}")
        active = _active_fraction(model)
        tritonslide.reset_stats(model)  # no re-hash before evaluating, as the demo (the net trained with its tables)
        accuracy = evaluate(model, data.x_test, data.y_test, scale.batch_size)
        rows.append({
            "net": net, "variant": variant, "method": METHOD[variant], "converted": ",".join(converted_layers(model)),
            "epochs": scale.epochs, "train_images": len(data.y_train), "test_images": len(data.y_test),
            "batch_size": scale.batch_size, **times, "accuracy": 100.0 * accuracy, "params": param_count(model),
            "active_fraction_train": active,
        })
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["epoch_s"] / base["epoch_s"]
        row["time_ratio_sum"] = row["epoch_s_sum"] / base["epoch_s_sum"]
        row["acc_points"] = row["accuracy"] - base["accuracy"]
    by = {r["variant"]: r for r in rows}
    milf = by["lsh+sketch"]
    milf["time_vs_lsh"] = milf["epoch_s"] / by["lsh"]["epoch_s"]
    milf["time_vs_sketch"] = milf["epoch_s"] / by["sketch"]["epoch_s"]
    return rows, notes


# ---------------------------------------------------------------------------------------------------- report
def _table(rows: list[dict[str, Any]]) -> str:
    header = ["net", "variant", "converted", "epoch s (median step x steps)", "vs vanilla", "epoch s (sum of steps)",
              "vs vanilla", "paper: time vs vanilla", "test acc %", "vs vanilla (points)",
              "paper: acc vs vanilla (points)"]
    body = [[r["net"], r["variant"], r["converted"] or "-", f"{r['epoch_s']:.2f}", f"{r['time_ratio']:.2f}x",
             f"{r['epoch_s_sum']:.2f}", f"{r['time_ratio_sum']:.2f}x", PAPER_TIME[r["variant"]],
             f"{r['accuracy']:.1f}", f"{r['acc_points']:+.1f}", PAPER_POINTS[r["variant"]]] for r in rows]
    return markdown_table(header, body)


def _summary(rows: list[dict[str, Any]], nets: tuple[str, ...]) -> str:
    def per_net(fmt) -> str:
        return "; ".join(f"{net} {fmt({r['variant']: r for r in rows if r['net'] == net})}" for net in nets)

    body = [
        ["training time, LSH+sketch vs vanilla", "~0.70x (about 30% less)", "sec. 6, 7 (Fig. 3)",
         per_net(lambda b: f"{b['lsh+sketch']['time_ratio']:.2f}x")],
        ["training time, LSH+sketch vs LSH / vs sketch", "about 15% less", "sec. 6 (Fig. 3)",
         per_net(lambda b: f"{b['lsh+sketch']['time_vs_lsh']:.2f}x / {b['lsh+sketch']['time_vs_sketch']:.2f}x")],
        ["accuracy, LSH / sketch vs vanilla", "about 2-3% lower", "sec. 6 (Fig. 4)",
         per_net(lambda b: f"{b['lsh']['acc_points']:+.1f} / {b['sketch']['acc_points']:+.1f} points")],
        ["accuracy, LSH+sketch vs vanilla", "about 5% lower", "sec. 6, 7 (Fig. 4)",
         per_net(lambda b: f"{b['lsh+sketch']['acc_points']:+.1f} points")],
        ["AlexNet, LSH+sketch", "~29% training time speedup vs pruning or sketching alone; ~5% training accuracy "
         "decrease", "abstract", "not run"],
    ]
    return markdown_table(["claim", "paper", "paper's source", "ours (time ratio: median-based epoch time)"], body)


def _plot(rows: list[dict[str, Any]], nets: tuple[str, ...], out_dir) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(zip(VARIANTS, ("o", "s", "^", "D")))
    colors = {net: f"C{i}" for i, net in enumerate(NETS)}
    for r in rows:
        ax.scatter(r["epoch_s"], r["accuracy"], marker=markers[r["variant"]], color=colors[r["net"]], s=55,
                   edgecolors="black", linewidths=0.5)
    times = [r["epoch_s"] for r in rows]
    if max(times) > 5 * min(times):
        ax.set_xscale("log")
    ax.set_xlabel("training time per epoch, s (median step x steps)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("CNN-SLIDE variants on digits28 (this machine)")
    net_handles = [plt.Line2D([], [], color=colors[n], marker="o", linestyle="", label=n) for n in nets]
    var_handles = [plt.Line2D([], [], color="gray", marker=markers[v], linestyle="", label=v) for v in VARIANTS]
    first = ax.legend(handles=net_handles, loc="lower left", title="network", fontsize=8)
    ax.add_artist(first)
    ax.legend(handles=var_handles, loc="lower right", title="variant", fontsize=8)
    ax.grid(alpha=0.3)
    return save_plot(fig, out_dir, "cnnslide_time_accuracy.png")


def _differences(rows: list[dict[str, Any]], scale: Scale, ctx: Context) -> str:
    n_train = rows[0]["train_images"]
    skipped = [n for n in FULL.nets if n not in scale.nets]
    faster = [r["net"] for r in rows if r["variant"] == "lsh+sketch" and r["time_ratio"] < 1.0]
    slower = [r["net"] for r in rows if r["variant"] == "lsh+sketch" and r["time_ratio"] >= 1.0]
    loads = [r["other_cpu_load"] for r in rows if r["other_cpu_load"] is not None]
    device = (f"this CPU ({torch.get_num_threads()} torch threads)" if ctx.device.type == "cpu"
              else f"{ctx.device} ({torch.cuda.get_device_name(ctx.device) if torch.cuda.is_available() else ''})")
    text = [
        f"What differs from the paper: scikit-learn's digits upscaled from 8x8 to 28x28 ({n_train} training and "
        f"{rows[0]['test_images']} test images) instead of MNIST / CIFAR-10, {scale.epochs} epoch(s) of "
        f"{rows[0]['steps_per_epoch']} steps at batch {scale.batch_size} instead of 10 epochs, on {device} with "
        f"torch {torch.__version__} instead of an A100; the network layouts are ours (the paper gives none), the "
        f"3-layer CNN keeps its first conv dense (the paper replaced every layer), AlexNet is not run"
        + (f" and {', '.join(skipped)} runs with `--full` only" if skipped else "") + ".",
        "Time per epoch is the median training step (forward, backward, Adam step; no data loading, no evaluation) "
        "times the steps per epoch; the sum of all steps, which includes ALSH's once-per-epoch re-hash, is beside "
        f"it; other processes used on average {100 * statistics.fmean(loads):.0f}% of the CPUs meanwhile."
        if loads and ctx.device.type == "cpu" else
        "Time per epoch: " + rows[0]["timing"] + ".",
        "Measured here, LSH+sketch trained "
        + (f"faster than vanilla on {', '.join(faster)}" if faster else "")
        + (" and " if faster and slower else "")
        + (f"no faster than vanilla on {', '.join(slower)}" if slower else "")
        + f" (tritonslide backend {tritonslide.current_backend()!r} on {ctx.device.type})."
        + (" With this few steps the accuracies are those of early training, so their differences carry little "
           "weight." if ctx.quick else ""),
    ]
    return " ".join(text)


def run(ctx: Context) -> Section:
    scale = QUICK if ctx.quick else FULL
    data = subset(digits28(ctx.seed), scale.train_subset, scale.test_subset, ctx.device)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for net in scale.nets:
        net_rows, net_notes = run_net(net, data, scale, ctx)
        rows += net_rows
        notes += net_notes
    plot = _plot(rows, scale.nets, ctx.out_dir)
    scale_note = (f"{ctx.scale}: {', '.join(scale.nets)}; {scale.epochs} epoch(s) over {len(data.y_train)} "
                  f"training images, batch {scale.batch_size}; test on {len(data.y_test)} images")
    markdown = "\n\n".join([
        "The paper's claims (its Fig. 3 / Fig. 4 plot the values per network; the text gives only this summary) "
        "beside ours:",
        _summary(rows, scale.nets),
        f"Every run, from the same initial weights and batch order ({scale_note}):",
        _table(rows),
        _differences(rows, scale, ctx),
    ])
    return Section(markdown=markdown, rows=rows, paper=copy.deepcopy(PAPER), plots=[plot],
                   notes=[scale_note] + notes)
