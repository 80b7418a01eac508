"""``csg``: associative convolution with a Convolutional Slice Generator (Omidvar et al., shared/papers/003, Table 1,
Table 2, sec. 3-4).

(a) ResNet-56 (:func:`tritonslide.models.resnet56`) parameters, dense vs ``tritonslide.patch(model, "csg")`` with
the default config (slices [16, 16, 3, 3], codes of 128, one generator ``A_CSG`` shared by every converted layer and
counted once, the first conv dense), beside Table 1's 853,018 -> 347,162 (2.45x). Our ResNet-56 has the 1x1
projection shortcuts of torchvision's ResNets (option B, 2,752 parameters in two ``downsample`` modules) where the
paper's has parameter-free ones (option A), and ``patch`` converts those 1x1 convs too, so the table also gives the
counts without the projections and with only the 3x3 convs converted (the paper's rule, sec. 4.2): those are the
paper's own configuration. The pre-trained, frozen generator of sec. 4.3 (trainable parameters: codes and the rest)
is counted as well. Serialized model sizes beside Table 2's; with ``--full`` also the training step time of both
models at batch 32 on 3x32x32 inputs (CIFAR-10's shape) beside Table 2's epoch times.

(b) The 8-layer CNN of CNN-SLIDE (``cnn8``: six 3x3 convs 32-32-64-64-128-128, so five share the generator) trained
from scratch on ``digits28`` dense and with CSG (patched before training, codes drawn at the dense layers' init
scale, ``init="scratch"``), from the same initial weights of the layers they share and in the same batch order
(Adam, lr 1e-3): parameters, median step time, test accuracy. At this size the generator (294,912 numbers) outweighs
the five convs it replaces (285,696): the count rises, as the paper notes for ResNet-20 (sec. 4.3); the table of
every net of the report shows where the generator starts to pay off.

Scales (:data:`QUICK`, :data:`FULL`, module-level so tests can shrink them): quick trains 2 epochs over the first
960 training images (30 steps per model: ~11 s of steps on an idle 2-core CPU, where a cnn8 step took 0.17-0.18 s
dense or CSG) and does not time ResNet-56 (a training step of it took 1-4 s at batch 8 on a shared 2-core CPU).
Full: 10 epochs over all 1,347 images, ResNet-56 timed over 5 rounds at batch 32.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tritonslide.compare import Context, Section
from tritonslide.compare._common import (
    NETS,
    digits28,
    evaluate,
    markdown_table,
    param_count,
    pyplot,
    save_plot,
    time_fn,
)
from tritonslide.compare.cnnslide import subset, train_timed
from tritonslide.models import resnet56
from tritonslide.nn.csg import CSGConv2d, SliceGenerator


@dataclass(frozen=True)
class Scale:
    """``net``: the network trained in part (b); ``train_subset`` / ``test_subset``: the first n images (None: all);
    ``resnet_batch``: batch of the ResNet-56 step timing (None: not timed), ``resnet_rounds`` timed steps each."""

    epochs: int
    net: str = "cnn8"
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 64
    resnet_batch: int | None = None
    resnet_rounds: int = 5


# quick: after 20 steps (2 x 640 images) the CSG cnn8 still predicted one class (10.2%, seed 0); after 30-40 steps
# of the full set both reached 73-88% (seed 0)
QUICK = Scale(epochs=2, train_subset=960)
FULL = Scale(epochs=10, resnet_batch=32, resnet_rounds=5)

PAPER_SOURCE = "Omidvar et al., Associative Convolutional Layers (shared/papers/003_61715c297856c536.txt)"
# Table 1 (CIFAR-10, ResNet-56 rows) and Table 2 (single GeForce 2080 Ti, mean +- std over 200 epochs), as printed.
PAPER_DENSE = {"params": 853_018, "test_err": 6.12, "ratio": 1.00, "train_s": 14.51, "train_s_std": 0.32,
               "test_s": 1.11, "test_s_std": 0.02, "size_mb": 3.33}
PAPER_CSG = {"params": 347_162, "test_err": 7.04, "ratio": 2.45, "train_s": 14.74, "train_s_std": 0.27,
             "test_s": 1.30, "test_s_std": 0.03, "size_mb": 1.40}
PAPER_PRETRAINED = {"params": 52_250, "test_err": 11.43, "ratio": 16.3}
PAPER: list[dict[str, Any]] = [
    {"model": "ResNet-56 (Original)", "source": "Table 1, Table 2", **PAPER_DENSE},
    {"model": "ResNet-56-CSG-[16,16,3,3]-128", "source": "Table 1, Table 2", **PAPER_CSG},
    {"model": "ResNet-56-CSG-[16,16,3,3]-128 w/ Pre-trained CSG on ResNet-20", "source": "Table 1, sec. 4.3",
     **PAPER_PRETRAINED},
    {"model": "setting", "source": "sec. 4.1, 4.2, App. B",
     "value": "CIFAR-10 (50K train / 10K test), trained from scratch 200 epochs, batch 192, lr 0.05 / 5e-3 / 5e-4, "
              "first conv dense, one GPU (GeForce 2080 Ti), PyTorch"},
]
for _fig in PAPER:
    _fig["paper"] = PAPER_SOURCE


# ---------------------------------------------------------------------------------------------------- counting
def _generators(model: nn.Module) -> list[SliceGenerator]:
    return list({id(m): m for m in model.modules() if isinstance(m, SliceGenerator)}.values())


def breakdown(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of ``model`` (``params``; a shared generator counts once) split into the generator
    ``A_CSG`` (0 when frozen), the code vectors and the rest; ``generator_all`` counts the generator even frozen."""
    gens = _generators(model)
    generator = sum(g.weight.numel() for g in gens if g.weight.requires_grad)
    codes = sum(m.codes.numel() for m in model.modules() if isinstance(m, CSGConv2d) and m.codes.requires_grad)
    total = param_count(model)
    return {"params": total, "generator": generator, "generator_all": sum(g.weight.numel() for g in gens),
            "codes": codes, "other": total - generator - codes}


def projection_params(model: nn.Module) -> int:
    """Trainable parameters of the ``downsample`` shortcuts (option B's 1x1 conv + BatchNorm; option A has none),
    converted or not; the shared generator, which a converted shortcut also holds, stays counted with the model."""
    shared = {id(g.weight) for g in _generators(model)}
    params = {id(p): p for name, m in model.named_modules() if name.endswith("downsample") for p in m.parameters()}
    return sum(p.numel() for i, p in params.items() if p.requires_grad and i not in shared)


def state_dict_mb(model: nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


def _is_3x3(module: nn.Module, name: str) -> bool:
    return name != "conv1" and tuple(getattr(module, "kernel_size", ())) == (3, 3)


def resnet_rows(ctx: Context) -> list[dict[str, Any]]:
    """Part (a): parameter counts of ResNet-56 dense and with CSG, per variant of the conversion."""
    torch.manual_seed(ctx.seed)
    dense = resnet56()
    variants: list[tuple[str, str, nn.Module, dict[str, Any] | None]] = [
        ("dense", "ResNet-56 dense", dense, PAPER_DENSE),
        ("csg", "CSG-[16,16,3,3]-128, patch default (every conv but the first, 1x1 projections too)",
         tritonslide.patch(copy.deepcopy(dense), "csg", init="scratch"), None),
        ("csg_3x3", "CSG-[16,16,3,3]-128, 3x3 convs only (the paper's rule; projections dense)",
         tritonslide.patch(copy.deepcopy(dense), "csg", init="scratch", filter_fn=_is_3x3), PAPER_CSG),
        ("csg_3x3_frozen", "same, generator pre-trained and frozen (sec. 4.3; not trained, not counted)",
         tritonslide.patch(copy.deepcopy(dense), tritonslide.CSGConfig(freeze_generator=True), init="scratch",
                           filter_fn=_is_3x3), PAPER_PRETRAINED),
    ]
    rows = []
    for key, label, model, paper in variants:
        counts = breakdown(model)
        option_a = counts["params"] - projection_params(model)
        paper = paper or {}
        rows.append({"part": "resnet56", "model": key, "label": label, **counts, "params_option_a": option_a,
                     "paper_params": paper.get("params"), "paper_ratio": paper.get("ratio"),
                     "paper_test_err": paper.get("test_err"), "_model": model})
    for row in rows:
        row["ratio"] = rows[0]["params"] / row["params"]
        row["ratio_option_a"] = rows[0]["params_option_a"] / row["params_option_a"]
    return rows


def resnet_timing(rows: list[dict[str, Any]], ctx: Context, scale: Scale) -> None:
    """State-dict sizes of dense and CSG (patch default), and with ``scale.resnet_batch`` the time of a training
    step (forward, backward, Adam step) on random 3x32x32 inputs; added to ``rows`` in place."""
    timed = [r for r in rows if r["model"] in ("dense", "csg")]
    for row in timed:
        row["size_mb"] = state_dict_mb(row["_model"])
        row["step_ms"] = None
        if scale.resnet_batch is None:
            continue
        gen = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn(scale.resnet_batch, 3, 32, 32, generator=gen).to(ctx.device)
        y = torch.randint(0, 10, (scale.resnet_batch,), generator=gen).to(ctx.device)
        model = copy.deepcopy(row["_model"]).to(ctx.device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        stats = time_fn(step, rounds=scale.resnet_rounds, warmup=1)
        row["step_ms"] = 1e3 * stats["median_s"]
        row["step_other_cpu_load"] = stats["other_cpu_load"]
    for row in timed:
        row["size_ratio"] = row["size_mb"] / timed[0]["size_mb"]
        row["step_ratio"] = None if row["step_ms"] is None else row["step_ms"] / timed[0]["step_ms"]


def net_count_rows() -> list[dict[str, Any]]:
    """Every net of the report and ResNet-56, dense vs CSG (patch default), counts only."""
    rows = []
    for name, build in [*NETS.items(), ("resnet56", resnet56)]:
        dense = build()
        csg = tritonslide.patch(build(), "csg", init="scratch")
        counts = breakdown(csg)
        convs = sum(m.weight.numel() for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1")
        rows.append({"part": "counts", "net": name, "dense": param_count(dense), "csg": counts["params"],
                     "ratio": param_count(dense) / counts["params"], "converted_conv_weights": convs,
                     "generator": counts["generator"], "codes": counts["codes"]})
    return rows


# ---------------------------------------------------------------------------------------------------- training
def train_rows(ctx: Context, scale: Scale) -> list[dict[str, Any]]:
    """Part (b): ``scale.net`` trained from scratch dense and with CSG, same initial weights and batch order."""
    data = subset(digits28(ctx.seed), scale.train_subset, scale.test_subset, ctx.device)
    torch.manual_seed(ctx.seed)
    init = NETS[scale.net]().to(ctx.device)
    rows = []
    for key in ("dense", "csg"):
        model = copy.deepcopy(init)
        if key == "csg":
            # patched before training; codes drawn at the dense layers' init scale (sec. 4.2: trained from scratch)
            tritonslide.patch(model, "csg", init="scratch")
        times = train_timed(model, data, epochs=scale.epochs, batch_size=scale.batch_size, ctx=ctx,
                            desc=f"{scale.net} {key}")
        accuracy = evaluate(model, data.x_test, data.y_test, scale.batch_size)
        rows.append({"part": "trained", "net": scale.net, "model": key, **breakdown(model), **times,
                     "accuracy": 100.0 * accuracy, "epochs": scale.epochs, "train_images": len(data.y_train),
                     "test_images": len(data.y_test), "batch_size": scale.batch_size,
                     "converted": ",".join(n for n, m in model.named_modules() if isinstance(m, CSGConv2d))})
    for row in rows:
        row["param_ratio"] = rows[0]["params"] / row["params"]
        row["time_ratio"] = row["epoch_s"] / rows[0]["epoch_s"]
        row["acc_points"] = row["accuracy"] - rows[0]["accuracy"]
    return rows


# ---------------------------------------------------------------------------------------------------- report
def _split(row: dict[str, Any]) -> str:
    if not row["generator_all"]:
        return "-"
    gen = f"{row['generator']:,}" if row["generator"] else f"({row['generator_all']:,} frozen)"
    return f"{gen} / {row['codes']:,} / {row['other']:,}"


def _paper_ratio(value: float) -> str:
    """As Table 1 prints its ratios: 1.00x, 2.45x, 16.3x."""
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _resnet_table(rows: list[dict[str, Any]]) -> str:
    header = ["ResNet-56", "ours: params", "dense / this", "generator / codes / other",
              "ours without the 2 projection shortcuts (= option A)", "dense / this", "paper: params (Table 1)",
              "paper: ratio (Table 1)", "paper: test err. (Table 1, CIFAR-10)"]
    body = [[r["label"], f"{r['params']:,}", f"{r['ratio']:.3f}x", _split(r), f"{r['params_option_a']:,}",
             f"{r['ratio_option_a']:.3f}x", "-" if r["paper_params"] is None else f"{r['paper_params']:,}",
             "-" if r["paper_ratio"] is None else _paper_ratio(r["paper_ratio"]),
             "-" if r["paper_test_err"] is None else f"{r['paper_test_err']:.2f}% (not trained here)"]
            for r in rows]
    return markdown_table(header, body)


def _table2(rows: list[dict[str, Any]], scale: Scale) -> str:
    timed = [r for r in rows if "size_mb" in r]
    paper = {"dense": PAPER_DENSE, "csg": PAPER_CSG}
    step_head = (f"ours: train step ms (batch {scale.resnet_batch}, 3x32x32)" if scale.resnet_batch
                 else "ours: train step (`--full` only)")
    header = ["ResNet-56", "ours: state_dict MB", "vs dense", "paper: model size MB (Table 2)", step_head,
              "vs dense", "paper: train time per epoch (Table 2)", "vs dense", "paper: test time per epoch"]
    body = []
    for r in timed:
        p = paper[r["model"]]
        body.append([
            "dense" if r["model"] == "dense" else "CSG-[16,16,3,3]-128", f"{r['size_mb']:.2f}",
            f"{r['size_ratio']:.2f}x", f"{p['size_mb']:.2f}", "-" if r["step_ms"] is None else f"{r['step_ms']:.0f}",
            "-" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}x",
            f"{p['train_s']:.2f} s +- {p['train_s_std']}",
            f"{p['train_s'] / PAPER_DENSE['train_s']:.3f}x", f"{p['test_s']:.2f} s +- {p['test_s_std']}",
        ])
    return markdown_table(header, body)


def _train_table(rows: list[dict[str, Any]]) -> str:
    paper = {"dense": ("853,018", "14.51 s / epoch", "6.12% err. (baseline)"),
             "csg": ("347,162 (2.45x fewer)", "14.74 s / epoch (1.016x)", "7.04% err. (-0.92 points)")}
    header = ["model", "converted", "params (trainable)", "dense / this", "generator / codes / other",
              "epoch s (median step x steps)", "vs dense", "test acc %", "vs dense (points)",
              "paper (ResNet-56, CIFAR-10): params", "paper: train time", "paper: accuracy"]
    body = [[f"{r['net']} {r['model']}", r["converted"] or "-", f"{r['params']:,}", f"{r['param_ratio']:.2f}x",
             _split(r), f"{r['epoch_s']:.2f}", f"{r['time_ratio']:.2f}x", f"{r['accuracy']:.1f}",
             f"{r['acc_points']:+.1f}", *paper[r["model"]]] for r in rows]
    return markdown_table(header, body)


def _counts_table(rows: list[dict[str, Any]]) -> str:
    header = ["net", "dense params", "conv weights converted", "CSG params (generator counted once)", "dense / CSG"]
    body = [[r["net"], f"{r['dense']:,}", f"{r['converted_conv_weights']:,}", f"{r['csg']:,}", f"{r['ratio']:.2f}x"]
            for r in rows]
    return markdown_table(header, body)


def _plot(resnet: list[dict[str, Any]], trained: list[dict[str, Any]], out_dir) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    dense, csg = resnet[0], next(r for r in resnet if r["model"] == "csg_3x3")
    ax = axes[0]
    xs = [0, 1]
    ax.bar([x - 0.2 for x in xs], [dense["params_option_a"] / 1e3, csg["params_option_a"] / 1e3], 0.4,
           label="ours (option A count)", color="C0")
    ax.bar([x + 0.2 for x in xs], [PAPER_DENSE["params"] / 1e3, PAPER_CSG["params"] / 1e3], 0.4,
           label="paper, Table 1", color="C7")
    ax.set_xticks(xs, ["dense", "CSG"])
    ax.set_ylabel("parameters, thousands")
    ax.set_title("ResNet-56 parameters")
    ax.legend(fontsize=8)
    labels = [r["model"] for r in trained]
    ax = axes[1]
    bottom = [0.0] * len(trained)
    for part, color in (("other", "C0"), ("codes", "C1"), ("generator", "C2")):
        values = [r[part] / 1e3 for r in trained]
        ax.bar(labels, values, bottom=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("parameters, thousands")
    ax.set_title(f"{trained[0]['net']} parameters")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.bar(labels, [r["accuracy"] for r in trained], color=["C0", "C1"])
    for i, r in enumerate(trained):
        ax.text(i, r["accuracy"], f"{r['accuracy']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"{trained[0]['net']} on digits28, {trained[0]['epochs']} epoch(s)")
    return save_plot(fig, out_dir, "csg_params_accuracy.png")


def run(ctx: Context) -> Section:
    scale = QUICK if ctx.quick else FULL
    resnet = resnet_rows(ctx)
    resnet_timing(resnet, ctx, scale)
    counts = net_count_rows()
    trained = train_rows(ctx, scale)
    plot = _plot(resnet, trained, ctx.out_dir)
    for row in resnet:
        del row["_model"]
    t0 = trained[0]
    generator = resnet[1]["generator"]
    scale_note = (f"{ctx.scale}: {t0['net']} {scale.epochs} epoch(s) over {t0['train_images']} training images, "
                  f"batch {scale.batch_size}, test on {t0['test_images']}; ResNet-56 step "
                  + (f"timed at batch {scale.resnet_batch} over {scale.resnet_rounds} rounds" if scale.resnet_batch
                     else "not timed (`--full`)"))
    differs = (
        "What differs from the paper: ResNet-56 was built and counted, not trained (its test errors are the paper's, "
        f"Table 1); the trained network is {t0['net']} on scikit-learn's digits upscaled to 28x28 "
        f"({t0['train_images']} training / {t0['test_images']} test images) for {scale.epochs} epoch(s) with Adam "
        "lr 1e-3, batch "
        f"{scale.batch_size}, instead of ResNet-56 on CIFAR-10 for 200 epochs (batch 192, lr 0.05 stepped down), on "
        f"{'this CPU' if ctx.device.type == 'cpu' else str(ctx.device)} with torch {torch.__version__} instead of a "
        f"GeForce 2080 Ti. Our ResNet-56 uses 1x1 projection shortcuts (option B); without them the counts are the "
        f"paper's configuration. In {t0['net']} the shared generator ({generator:,} numbers) is larger than the "
        f"conv weights it replaces, so CSG adds parameters there, as the paper reports for ResNet-20 (sec. 4.3); "
        "the codes alone are 18x smaller than the slices they generate (128 vs 2,304)."
    )
    loads = [r["other_cpu_load"] for r in trained if r.get("other_cpu_load") is not None]
    if loads and ctx.device.type == "cpu":
        differs += (f" Step times are medians; other processes used on average {100 * sum(loads) / len(loads):.0f}% "
                    "of the CPUs while (b) trained.")
    markdown = "\n\n".join([
        "(a) ResNet-56 parameters (CIFAR-10 head, 10 classes), dense vs CSG:",
        _resnet_table(resnet),
        "Model size and time (Table 2 measured whole epochs on a GPU; ours is one training step on this machine):",
        _table2(resnet, scale),
        f"(b) {t0['net']} trained from scratch on digits28, dense vs CSG (same initial weights of the shared layers "
        f"and batch order; {scale_note}):",
        _train_table(trained),
        "Where the shared generator pays off: every net of this report, dense vs CSG (patch default), counts only:",
        _counts_table(counts),
        differs,
    ])
    rows = resnet + counts + trained
    return Section(markdown=markdown, rows=rows, paper=copy.deepcopy(PAPER), plots=[plot], notes=[scale_note])
