"""Section ``selection``: per-sample vs per-batch ALSH active sets (issue #15; no paper figure: this goes beyond the
anchors, which all choose one set per batch, Feeney 2019 sec. 4.2, CNN-SLIDE sec. 4.1).

Four parts, each run with the same ALSH config (3 tables of 5 bits, top 5 buckets, m = 2) under both selections:

* ``digits``: the 3-layer CNN (``--full``: the 8-layer CNN too) of the ``cnnslide`` section trained on digits28 with
  ALSH on the same layers (re-hashed once per epoch), once with per-batch sets and once with per-sample sets, from
  the same initial weights and batch order. Each is tested per batch (test batches of 64: a prediction depends on
  the other 63) and per sample. Reported: test accuracy, mean active fraction, training time per epoch (median
  step x steps) and evaluation time per test image.
* ``imagenet``: AlexNet and VGG-11 (``tritonslide.models``, seeded init) with every convolution an ALSH layer, in
  eval on photograph crops (scikit-learn's sample images): forward time (``torch.inference_mode``, hashing and
  selection included) per batch and per sample selection, dense in the same process (round-robin: each round
  calls dense, per batch and per sample once), the mean active fraction, and how far the outputs of four samples
  move when they are run alone instead of inside the batch.
* ``batchnorm``: the 3-layer CNN with a BatchNorm after each convolution (``cnn3_bn``), ALSH on conv2 / conv3, with
  ``tritonslide.patch(..., batchnorm="keep")`` (plain BatchNorm after the ALSH layers) and ``"impute"`` (the
  default: :class:`~tritonslide.nn.ImputedBatchNorm2d`). Trained from scratch per batch and per sample, and
  converted from the dense net trained for the same epochs: tested per sample as converted, then fine-tuned per
  batch and per sample for a fifth of the epochs (at least one). Each tested per sample and per batch.
* ``batchnorm_densenet``: a small DenseNet-BC (``tritonslide.models.DenseNet``: growth 32, two blocks of three
  layers, 32 initial features, one input channel) with ALSH on its six 3x3 convolutions, whose outputs reach
  BatchNorms only through concatenations (no BatchNorm is registered after them). Trained from scratch with plain
  BatchNorm (``"keep"``), with BatchNorms paired by registration order only (``"order"``:
  ``impute_batchnorms(model, trace=False)``, which pairs none here), and with patch's default (``"impute"``: the
  ``torch.fx`` data flow finds the six BatchNorms after the concatenations); per batch, and the default per sample
  too. Each tested per sample and per batch.

The figures decide ``ALSHConfig.selection``'s default (the README gives them).
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
from tritonslide._benchtools import sample_crops
from tritonslide.compare import Context, Section
from tritonslide.compare._common import NETS, cnn3_bn, digits28, markdown_table, pyplot, save_plot, time_round_robin
from tritonslide.compare.cnnslide import LAYERS, subset, train_timed
from tritonslide.demo import train
from tritonslide.models import DenseNet
from tritonslide.nn.batchnorm import _ImputedNorm

SELECTIONS = ("batch", "sample")

# No paper measured per-sample sets: the anchors' own setting, quoted as the baseline of the comparison.
PAPER: list[dict[str, Any]] = [
    {"figure": "who shares an active set", "value": "one set per batch: the top buckets of the histogram of all the "
     "batch's patches, in training and in testing", "source": "Feeney 2019, sec. 4.2 and 5.1.1, Alg. 4",
     "paper": "shared/papers/001"},
    {"figure": "who shares an active set", "value": "ALSH filter selection per batch, as Feeney's", "source":
     "CNN-SLIDE, sec. 4.1", "paper": "shared/papers/000"},
]


@dataclass(frozen=True)
class Scale:
    nets: tuple[str, ...]
    epochs: int
    train_subset: int | None
    batch: int  # ImageNet-shape part: images per forward
    size: int  # and their side
    rounds: int
    threads: int | None  # torch CPU threads for the ImageNet-shape timings (None: torch's default)


# quick: cnn3, 2 x 15 training steps per selection (~10 s of steps on the 2-core dev CPU) and AlexNet / VGG-11 at
# batch 8, 128 px, 2 rounds, 1 thread (VGG-11 ~0.9 s per forward): ~45 s for the section.
QUICK = Scale(nets=("cnn3",), epochs=2, train_subset=960, batch=8, size=128, rounds=2, threads=1)
# full: both CNNs for 10 epochs; the batch 64 at 224 px with torch's default threads, 5 interleaved rounds.
FULL = Scale(nets=("cnn3", "cnn8"), epochs=10, train_subset=None, batch=64, size=224, rounds=5, threads=None)
IMAGENET_MODELS = {"alexnet": tritonslide.models.alexnet, "vgg11": tritonslide.models.vgg11}


def _alsh(selection: str, seed: int, rebuild_every: int | None = None) -> tritonslide.ALSHConfig:
    return tritonslide.ALSHConfig(selection=selection, seed=seed, rebuild_every=rebuild_every)


def _mean_active(model: nn.Module) -> float:
    return statistics.fmean(s.active_fraction for s in tritonslide.stats(model).values())


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """(accuracy %, seconds per image) of ``model`` in eval, in test batches of ``batch``."""
    model.eval()
    correct = 0
    start = time.perf_counter()
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y), (time.perf_counter() - start) / len(y)


def digits_rows(ctx: Context, scale: Scale) -> list[dict[str, Any]]:
    data = subset(digits28(ctx.seed), scale.train_subset, None, ctx.device)
    rows = []
    for net in scale.nets:
        torch.manual_seed(ctx.seed)
        init = NETS[net]().to(ctx.device)
        per_epoch = math.ceil(len(data.y_train) / 64)
        for trained in SELECTIONS:
            model = tritonslide.patch(copy.deepcopy(init), _alsh(trained, ctx.seed, per_epoch),
                                      filter_fn=lambda module, name: name in LAYERS[net])
            times = train_timed(model, data, epochs=scale.epochs, batch_size=64, ctx=ctx, desc=f"{net} {trained}")
            active_train = _mean_active(model)
            for tested in SELECTIONS:
                tritonslide.set_selection(model, tested)
                tritonslide.reset_stats(model)
                accuracy, per_image = _evaluate(model, data.x_test, data.y_test, 64)
                rows.append({
                    "part": "digits", "net": net, "trained": trained, "tested": tested, "epochs": scale.epochs,
                    "train_images": len(data.y_train), "test_images": len(data.y_test), "accuracy": accuracy,
                    "active_fraction_train": active_train, "active_fraction_test": _mean_active(model),
                    "epoch_s": times["epoch_s"], "other_cpu_load": times["other_cpu_load"],
                    "eval_ms_per_image": 1e3 * per_image,
                })
    return rows


BATCHNORM_MODES = ("keep", "impute")


@torch.no_grad()
def _accuracies(model: nn.Module, data, restore: str) -> dict[str, float]:
    """Test accuracy per sample and per batch (test batches of 64); ``model`` is left with ``restore`` selection."""
    out = {}
    with warnings.catch_warnings():  # set_selection("sample") beside BatchNorm warns about training
        warnings.simplefilter("ignore", UserWarning)
        for tested in SELECTIONS:
            tritonslide.set_selection(model, tested)
            out[tested] = _evaluate(model, data.x_test, data.y_test, 64)[0]
        tritonslide.set_selection(model, restore)
    return out


def batchnorm_rows(ctx: Context, scale: Scale) -> list[dict[str, Any]]:
    data = subset(digits28(ctx.seed), scale.train_subset, None, ctx.device)
    per_epoch = math.ceil(len(data.y_train) / 64)
    finetune = max(1, scale.epochs // 5)
    torch.manual_seed(ctx.seed)
    init = cnn3_bn().to(ctx.device)
    rows: list[dict[str, Any]] = []

    def patched(model: nn.Module, selection: str, batchnorm: str) -> nn.Module:
        with warnings.catch_warnings():  # per-sample training beside BatchNorm warns: measuring it is the point
            warnings.simplefilter("ignore", UserWarning)
            return tritonslide.patch(model, _alsh(selection, ctx.seed, per_epoch), batchnorm=batchnorm,
                                     filter_fn=lambda module, name: name in LAYERS["cnn3"])

    def add(start: str, batchnorm: str, trained: str, epochs: int, model: nn.Module) -> None:
        if trained == "dense":  # no selection: one test pass serves both columns
            acc = dict.fromkeys(SELECTIONS, _evaluate(model, data.x_test, data.y_test, 64)[0])
        else:
            acc = _accuracies(model, data, trained if trained in SELECTIONS else "batch")
        for tested in SELECTIONS:
            rows.append({"part": "batchnorm", "net": "cnn3_bn", "start": start, "batchnorm": batchnorm,
                         "trained": trained, "tested": tested, "epochs": epochs, "accuracy": acc[tested]})

    for batchnorm in BATCHNORM_MODES:
        for trained in SELECTIONS:
            model = patched(copy.deepcopy(init), trained, batchnorm)
            train_timed(model, data, epochs=scale.epochs, batch_size=64, ctx=ctx,
                        desc=f"cnn3_bn {trained} {batchnorm}")
            add("scratch", batchnorm, trained, scale.epochs, model)
    dense = copy.deepcopy(init)
    train(dense, data, epochs=scale.epochs, batch_size=64, seed=ctx.seed, progress=ctx.progress,
          desc="cnn3_bn dense")
    add("dense", "-", "dense", scale.epochs, dense.eval())
    for batchnorm in BATCHNORM_MODES:
        add("converted", batchnorm, "none", 0, patched(copy.deepcopy(dense), "batch", batchnorm))
        for trained in SELECTIONS:
            model = patched(copy.deepcopy(dense), trained, batchnorm)
            train(model, data, epochs=finetune, batch_size=64, seed=ctx.seed + 1, progress=ctx.progress,
                  desc=f"cnn3_bn fine-tune {trained} {batchnorm}")
            add("converted", batchnorm, trained, finetune, model)
    return rows


def densenet_rows(ctx: Context, scale: Scale) -> list[dict[str, Any]]:
    data = subset(digits28(ctx.seed), scale.train_subset, None, ctx.device)
    per_epoch = math.ceil(len(data.y_train) / 64)
    torch.manual_seed(ctx.seed)
    init = DenseNet(growth_rate=32, block_config=(3, 3), num_init_features=32, bn_size=4, num_classes=10,
                    in_channels=1).to(ctx.device)
    rows: list[dict[str, Any]] = []
    variants = [("-", "dense"), ("keep", "batch"), ("order", "batch"), ("impute", "batch"), ("impute", "sample")]
    for batchnorm, trained in variants:
        model = copy.deepcopy(init)
        if trained != "dense":
            with warnings.catch_warnings():  # per-sample training beside plain BatchNorm warns
                warnings.simplefilter("ignore", UserWarning)
                model = tritonslide.patch(model, _alsh(trained, ctx.seed, per_epoch),
                                          batchnorm="keep" if batchnorm == "order" else batchnorm,
                                          filter_fn=lambda module, name: name.endswith("conv2"))
            if batchnorm == "order":
                tritonslide.impute_batchnorms(model, trace=False)
        imputed = sum(isinstance(m, _ImputedNorm) for m in model.modules())
        train(model, data, epochs=scale.epochs, batch_size=64, seed=ctx.seed, progress=ctx.progress,
              desc=f"densenet {trained} {batchnorm}")
        if trained == "dense":
            acc = dict.fromkeys(SELECTIONS, _evaluate(model, data.x_test, data.y_test, 64)[0])
        else:
            acc = _accuracies(model, data, trained)
        for tested in SELECTIONS:
            rows.append({"part": "batchnorm_densenet", "net": "densenet_digits", "batchnorm": batchnorm,
                         "trained": trained, "tested": tested, "epochs": scale.epochs, "accuracy": acc[tested],
                         "imputed_batchnorms": imputed})
    return rows


def imagenet_rows(ctx: Context, scale: Scale) -> list[dict[str, Any]]:
    x = sample_crops(scale.batch, scale.size, ctx.seed).to(ctx.device)
    threads = torch.get_num_threads()
    if scale.threads is not None and ctx.device.type == "cpu":
        torch.set_num_threads(scale.threads)
    rows = []
    try:
        for name, build in IMAGENET_MODELS.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed)
                dense = build().eval().to(ctx.device)

            def forward(model: nn.Module) -> torch.Tensor:
                with torch.inference_mode():
                    return model(x)

            models = {"dense": dense}
            for selection in SELECTIONS:
                models[f"alsh_{selection}"] = tritonslide.patch(copy.deepcopy(dense), _alsh(selection, ctx.seed),
                                                                filter_fn=lambda module, name: True).eval()
            # one call of each variant per round: a slow phase of the machine hits all three alike
            timed = time_round_robin({k: (lambda m=m: forward(m)) for k, m in models.items()}, rounds=scale.rounds)
            base = timed["dense"]
            rows.append({"part": "imagenet", "model": name, "variant": "dense", "mean_s": base["mean_s"],
                         "median_s": base["median_s"], "batch": scale.batch, "size": scale.size})
            for selection in SELECTIONS:
                model, stat = models[f"alsh_{selection}"], timed[f"alsh_{selection}"]
                tritonslide.reset_stats(model)
                with torch.inference_mode():
                    model(x)  # the active fraction of one call on x, as before
                active = _mean_active(model)
                with torch.inference_mode():
                    full, alone = model(x), torch.cat([model(x[i:i + 1]) for i in range(min(4, len(x)))])
                moved = float((alone - full[: len(alone)]).abs().max() / full.abs().max())
                agree = float((alone.argmax(1) == full[: len(alone)].argmax(1)).float().mean())
                rows.append({"part": "imagenet", "model": name, "variant": f"alsh_{selection}",
                             "mean_s": stat["mean_s"], "median_s": stat["median_s"], "batch": scale.batch,
                             "size": scale.size, "active_fraction": active, "alone_vs_batch_rel": moved,
                             "alone_vs_batch_argmax_agree": agree, "vs_dense": base["median_s"] / stat["median_s"]})
            by = {r["variant"]: r for r in rows if r.get("model") == name}
            by["alsh_sample"]["sample_vs_batch"] = by["alsh_sample"]["median_s"] / by["alsh_batch"]["median_s"]
    finally:
        torch.set_num_threads(threads)
    return rows


def _markdown(rows: list[dict[str, Any]], scale: Scale, ctx: Context) -> str:
    digits = [r for r in rows if r["part"] == "digits"]
    imagenet = [r for r in rows if r["part"] == "imagenet"]
    norms = [r for r in rows if r["part"] == "batchnorm"]
    by = {(r["start"], r["batchnorm"], r["trained"], r["tested"]): r["accuracy"] for r in norms}
    t3 = markdown_table(
        ["start", "trained with (epochs)", "BatchNorm", "test acc %, per sample", "per batch"],
        [[r["start"], f"{r['trained']} ({r['epochs']})", r["batchnorm"], f"{r['accuracy']:.1f}",
          f"{by[(r['start'], r['batchnorm'], r['trained'], 'batch')]:.1f}"]
         for r in norms if r["tested"] == "sample"])
    dense_nets = [r for r in rows if r["part"] == "batchnorm_densenet"]
    by_net = {(r["batchnorm"], r["trained"], r["tested"]): r["accuracy"] for r in dense_nets}
    t4 = markdown_table(
        ["BatchNorm", "trained with (epochs)", "imputing BatchNorms", "test acc %, per sample", "per batch"],
        [[r["batchnorm"], f"{r['trained']} ({r['epochs']})", r["imputed_batchnorms"], f"{r['accuracy']:.1f}",
          f"{by_net[(r['batchnorm'], r['trained'], 'batch')]:.1f}"] for r in dense_nets if r["tested"] == "sample"])
    t1 = markdown_table(
        ["net", "trained with", "tested with", "test acc %", "active (train)", "active (test)", "epoch s",
         "eval ms / image"],
        [[r["net"], r["trained"], r["tested"], f"{r['accuracy']:.1f}", f"{r['active_fraction_train']:.2f}",
          f"{r['active_fraction_test']:.2f}", f"{r['epoch_s']:.2f}", f"{r['eval_ms_per_image']:.2f}"]
         for r in digits])
    t2 = markdown_table(
        ["model", "variant", "median s / batch", "vs dense", "sample / batch time", "active fraction",
         "4 samples alone vs in batch (max rel. diff, argmax agree)"],
        [[r["model"], r["variant"], f"{r['median_s']:.3f}", f"{r['vs_dense']:.2f}x" if "vs_dense" in r else "1",
          f"{r['sample_vs_batch']:.2f}x" if "sample_vs_batch" in r else "",
          f"{r['active_fraction']:.2f}" if "active_fraction" in r else "",
          f"{r['alone_vs_batch_rel']:.2g}, {r['alone_vs_batch_argmax_agree']:.0%}" if "alone_vs_batch_rel" in r
          else ""] for r in imagenet])
    threads = scale.threads if scale.threads is not None else torch.get_num_threads()
    where = f"this CPU, {threads} torch thread(s)" if ctx.device.type == "cpu" else str(ctx.device)
    return "\n\n".join([
        f"Digits ({', '.join(scale.nets)}, {scale.epochs} epoch(s), ALSH on "
        f"{', '.join(sorted({c for n in scale.nets for c in LAYERS[n]}))}; test batches of 64):",
        t1,
        f"ImageNet shapes (every convolution ALSH, eval, batch {scale.batch} at {scale.size} px, {where}; the "
        "timed call includes hashing and selection; medians of the rounds, each round one call of every variant):",
        t2,
        "No paper reports per-sample selection (Feeney 2019 sec. 4.2 and CNN-SLIDE sec. 4.1 choose one set per "
        "batch), so there is no paper column. Per batch, a sample's prediction depends on its companions (the last "
        "column); per sample it does not, by construction (tests/test_sample_selection.py checks 1e-5).",
        "BatchNorm after the ALSH layers (cnn3 with a BatchNorm after each convolution, ALSH on conv2 / conv3; "
        "'keep': plain nn.BatchNorm2d, 'impute': tritonslide.nn.ImputedBatchNorm2d, the patch default; 'converted' "
        "starts from the dense row's weights, 'none' is before fine-tuning):",
        t3,
        "BatchNorm after concatenations (a DenseNet-BC on digits28, ALSH on its six 3x3 convolutions; 'order': "
        "BatchNorms paired by registration order only, 'impute': patch's default, which also follows the torch.fx "
        "data flow through torch.cat):",
        t4,
    ])


def _plot(rows: list[dict[str, Any]], out_dir) -> str:
    """Left: test accuracy per (net, trained with / tested with); right: time per batch relative to dense."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    digits = [r for r in rows if r["part"] == "digits"]
    labels = [f"{r['net']}\n{r['trained'][0]}/{r['tested'][0]}" for r in digits]
    left.bar(range(len(digits)), [r["accuracy"] for r in digits],
             color=["C0" if r["trained"] == r["tested"] else "C3" for r in digits])
    left.set_xticks(range(len(digits)), labels, fontsize=7)
    left.set_ylim(min(r["accuracy"] for r in digits) - 5, 100)
    left.set_ylabel("test accuracy, %")
    left.set_title("digits: trained / tested per batch (b) or sample (s)", fontsize=9)
    imagenet = [r for r in rows if r["part"] == "imagenet" and r["variant"] != "dense"]
    right.bar(range(len(imagenet)), [1 / r["vs_dense"] for r in imagenet],
              color=["C1" if r["variant"] == "alsh_batch" else "C2" for r in imagenet])
    right.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    right.set_xticks(range(len(imagenet)), [f"{r['model']}\n{r['variant'][5:]}" for r in imagenet], fontsize=8)
    right.set_ylabel("time per batch / dense")
    right.set_title("ImageNet shapes, every conv ALSH, eval", fontsize=9)
    return save_plot(fig, out_dir, "selection.png")


def run(ctx: Context) -> Section:
    scale = QUICK if ctx.quick else FULL
    rows = digits_rows(ctx, scale) + batchnorm_rows(ctx, scale) + densenet_rows(ctx, scale) + imagenet_rows(ctx, scale)
    note = (f"{ctx.scale}: digits {', '.join(scale.nets)} x {scale.epochs} epoch(s); ImageNet shapes batch "
            f"{scale.batch} at {scale.size} px, {scale.rounds} rounds")
    return Section(markdown=_markdown(rows, scale, ctx), rows=rows, paper=copy.deepcopy(PAPER),
                   plots=[_plot(rows, ctx.out_dir)], notes=[note])
