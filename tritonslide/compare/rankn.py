"""``compare`` section ``rankn``: Rank-N filter approximation, error and time against rank (Jaladi, shared/papers/002,
sec. IX, XIII-XIV).

For both schemes of :class:`~tritonslide.nn.LowRankConv2d` (``LowRankConfig.scheme``: ``"filter"``, the paper's
per-slice truncated SVD, sec. IX; ``"channel"``, the package's separable basis shared across channels) and every rank
of the grid (1..5 as in the paper):

- on each trained convolution of the 3-layer CNN (:func:`tritonslide.compare.sketching.trained_cnn3`, shared with the
  ``sketching`` section): the relative weight error ``||W_r - W||_F / ||W||_F`` beside Eckart-Young's value
  ``sqrt(sum_{i>r} s_i^2) / ||W||_F`` (sec. IX) from the singular values, and the relative output error
  ``||y_r - y|| / ||y - b||`` on the layer's real inputs (test images through the trained network; the bias is kept
  exactly, so it is left out of the denominator);
- the test accuracy of the CNN with all three convolutions converted (as the paper approximates both of its
  convolutions), without fine-tuning, and the time of its forward over the test set against the dense CNN's;
- the forward time of ``conv3``'s trained weights (64 -> 64, 3x3) as a LowRankConv2d against the dense ``nn.Conv2d``
  on a larger map (``time_batch`` x 64 x ``time_hw`` x ``time_hw``), timed in the same process with
  :func:`~tritonslide.compare._common.time_fn` (pytest-benchmark's timer; the two arms alternately, on one thread by
  default, see :data:`TIME_THREADS` and :func:`paired_time`), with the multiply-add ratio beside it.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

import tritonslide
from tritonslide.compare import Context, Section
from tritonslide.compare._common import evaluate, markdown_table, pyplot, save_plot, time_fn
from tritonslide.compare.sketching import layer_input, torch_threads, train_settings, trained_cnn3
from tritonslide.configs import LowRankConfig
from tritonslide.nn import LowRankConv2d
from tritonslide.nn.lowrank import channel_factors, filter_factors

# ranks: the grid (the paper's 1..5; full adds channel-scheme ranks where 3x3 filter slices are long exact);
# error_batch: test images whose activations feed the error measurement; time_*: the timed input of conv3's weights;
# blocks x rounds: the dense and the low-rank arm timed alternately, `rounds` calls each per block (see paired_time);
# model_images / model_batch: the test images and their batch when timing the whole CNN (the paper fed its 10,000
# test images one at a time: full does the same with all 450 of ours; quick times 64 in one batch, since the 450 at
# 8x8 took ~0.35 s per call on the loaded 2-core machine)
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"ranks": (1, 2, 3, 4, 5), "error_batch": 128, "time_batch": 4, "time_hw": 28, "blocks": 5,
              "rounds": 3, "model_images": 64, "model_batch": 64, "model_blocks": 5, "model_rounds": 2},
    "full": {"ranks": (1, 2, 3, 4, 5, 8, 16, 32), "error_batch": 450, "time_batch": 64, "time_hw": 28, "blocks": 10,
             "rounds": 5, "model_images": 450, "model_batch": 1, "model_blocks": 3, "model_rounds": 1},
}
# Intra-op threads of the timed calls (None: the caller's). One: with other processes on the shared 2-core machine,
# two-thread timings were ruled by the stalls of each parallel op, not by the work: the channel scheme at rank 2
# (2% of the dense multiply-adds, two convolutions) measured 1.4x the dense conv on 2 threads and 0.22x on 1, and
# the medians of two identical layers differed by up to 6x.
TIME_THREADS: int | None = 1
SCHEMES = ("filter", "channel")
LAYERS = ("conv1", "conv2", "conv3")
TIME_LAYER = "conv3"

# shared/papers/002 sec. XIV (Results Analysis; Fig. 7 and 9 plot them per epoch): average time to test the 10,000
# CIFAR-10 test images and average test accuracy, per method
PAPER_DENSE: dict[str, Any] = {"source": "sec. XIV", "method": "PyTorch forward (rank -1)", "accuracy": 0.39713,
                               "test_time_s": 9.1}
PAPER_RANKS: tuple[dict[str, Any], ...] = tuple(
    {"source": "sec. XIV", "method": f"rank-{r} approximation", "rank": r, "accuracy": acc, "test_time_s": t,
     "time_ratio_vs_pytorch": t / PAPER_DENSE["test_time_s"], "accuracy_vs_dense": acc / PAPER_DENSE["accuracy"]}
    for r, acc, t in ((1, 0.23452, 7.95), (2, 0.35717, 8.04), (3, 0.37782, 8.35), (4, 0.39202, 8.68),
                      (5, 0.39713, 9.03))
)
PAPER_OTHER: tuple[dict[str, Any], ...] = (
    {"source": "sec. XIV", "method": "numpy loops (rank 0)", "accuracy": 0.39713,
     "note": "over 13 times slower than the nearest method's average time per test epoch"},
    {"source": "sec. X-XII", "setting": "CIFAR-10 in 32x32 grayscale; two convolutions with one 5x5 filter each "
     "(F1, F2), ReLU, 2x2 max-pool, two linear layers; 250 epochs; 10,000 test images one at a time per epoch; "
     "rank 5 is exact for 5x5 filters"},
)


def _path(layer: LowRankConv2d, out_h: int, out_w: int) -> str:
    """How the layer runs: separable convolutions, or one convolution with the rebuilt kernel (the filter scheme
    where separable would not save multiply-adds)."""
    return "dense" if layer.macs(out_h, out_w) == layer.dense_macs(out_h, out_w) else "separable"


def _eckart_young(singular_values: torch.Tensor, rank: int) -> float:
    """``sqrt(sum_{i>r} s_i^2) / ||W||_F``: the smallest relative error any rank-r form of the scheme can have
    (``singular_values``: (..., n), per filter slice or of the reshaped kernel)."""
    s = singular_values
    return float(s[..., rank:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())


def singular_values(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The singular values the scheme truncates: per 3x3 slice ("filter") or of the (C kh) x (O kw) reshape."""
    factors = filter_factors if scheme == "filter" else channel_factors
    return factors(weight, 1)[2]


@torch.no_grad()
def layer_errors(name: str, conv: nn.Conv2d, x: torch.Tensor, scheme: str, rank: int,
                 svals: torch.Tensor | None = None) -> dict[str, Any]:
    """One trained conv layer at one (scheme, rank): weight, Eckart-Young and output errors, parameters.
    ``svals``: :func:`singular_values` of the layer for the scheme, when the caller has them already."""
    layer = LowRankConv2d.from_dense(conv, LowRankConfig(rank=rank, scheme=scheme, init="fit"), name=name)
    w = conv.weight.double()
    y = conv(x).double()
    bias = conv.bias.double().view(1, -1, 1, 1) if conv.bias is not None else 0
    dense_params = sum(p.numel() for p in conv.parameters())
    out_h, out_w = y.shape[-2:]
    return {
        "kind": "layer", "layer": name, "shape": f"{conv.in_channels}->{conv.out_channels}, "
        f"{conv.kernel_size[0]}x{conv.kernel_size[1]}", "scheme": scheme, "rank": rank,
        "effective_rank": layer.rank, "full_rank": layer.full_rank,
        "weight_error": float((layer.reconstructed_weight().double() - w).norm() / w.norm()),
        "eckart_young": _eckart_young(singular_values(conv.weight, scheme) if svals is None else svals,
                                      layer.rank),
        "output_error": float((layer(x).double() - y).norm() / (y - bias).norm()),
        "params": layer.param_count(), "dense_params": dense_params, "params_ratio": layer.param_count() / dense_params,
        "macs_ratio": layer.macs(out_h, out_w) / layer.dense_macs(out_h, out_w),
        "path": _path(layer, out_h, out_w),
    }


def _convert(model: nn.Module, scheme: str, rank: int) -> nn.Module:
    """A converted deep copy: every convolution (the first too, as the paper approximates both of its filters)."""
    return tritonslide.patch(copy.deepcopy(model), LowRankConfig(rank=rank, scheme=scheme, init="fit"),
                             filter_fn=lambda module, name: True)


def paired_time(dense_fn: Any, low_fn: Any, blocks: int, rounds: int) -> dict[str, Any]:
    """Time the two arms alternately with :func:`time_fn`: one warm-up call each, then ``blocks`` times ``rounds``
    calls of the dense arm followed by ``rounds`` of the low-rank one. The ratio is the median over the blocks of
    (fastest low-rank call / fastest dense call), so both arms of a ratio ran under the same load."""
    dense_fn()
    low_fn()
    ratios, dense_all, low_all, load = [], [], [], 0.0
    for _ in range(blocks):
        d, low = time_fn(dense_fn, rounds=rounds, warmup=0), time_fn(low_fn, rounds=rounds, warmup=0)
        ratios.append(low["min_s"] / d["min_s"])
        dense_all += d["data_s"]
        low_all += low["data_s"]
        load = max(load, d["other_cpu_load"] or 0.0, low["other_cpu_load"] or 0.0)
    return {"ratio": statistics.median(ratios), "block_ratios": ratios, "min_s": min(low_all),
            "median_s": statistics.median(low_all), "dense_min_s": min(dense_all),
            "dense_median_s": statistics.median(dense_all), "calls": blocks * rounds, "other_cpu_load": load}


def _forward_all(model: nn.Module, x: torch.Tensor, batch: int):
    def call() -> None:
        with torch.no_grad():
            for start in range(0, len(x), batch):
                model(x[start:start + batch])
    return call


def _plot_errors(ctx: Context, layers: list[dict[str, Any]], acc: list[dict[str, Any]], dense_acc: float,
                 ranks: tuple[int, ...]) -> str:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(LAYERS):
        for scheme, style in (("filter", "-"), ("channel", "--")):
            rows = [r for r in layers if r["layer"] == name and r["scheme"] == scheme]
            ax.plot([r["rank"] for r in rows], [max(r["output_error"], 1e-7) for r in rows], color=colors[i],
                    linestyle=style, marker="o", label=f"{name} ({rows[0]['shape']}), {scheme}")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("relative output error (floor 1e-7)")
    ax.set_title("trained cnn3 convolutions, no fine-tuning", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    for scheme, style in (("filter", "-"), ("channel", "--")):
        rows = [r for r in acc if r["scheme"] == scheme]
        bx.plot([r["rank"] for r in rows], [r["accuracy"] / dense_acc for r in rows], linestyle=style, marker="o",
                label=f"ours, {scheme} (3x3)")
    bx.plot([p["rank"] for p in PAPER_RANKS], [p["accuracy_vs_dense"] for p in PAPER_RANKS], color="black",
            marker="x", linestyle=":", label="paper (5x5 filters, CIFAR-10 gray)")
    bx.axhline(1.0, color="grey", linewidth=0.8)
    bx.set_xlabel("rank")
    bx.set_ylabel("test accuracy / dense test accuracy")
    bx.set_xticks(list(ranks))
    bx.grid(True, alpha=0.3)
    bx.legend(fontsize=7)
    return save_plot(fig, ctx.out_dir, "rankn_error.png")


def _plot_time(ctx: Context, times: list[dict[str, Any]], acc: list[dict[str, Any]], ranks: tuple[int, ...]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, scheme in enumerate(SCHEMES):
        rows = [r for r in times if r["scheme"] == scheme]
        ax.plot([r["rank"] for r in rows], [r["time_ratio"] for r in rows], color=colors[i], marker="o",
                label=f"{scheme}: conv3 layer, measured")
        ax.plot([r["rank"] for r in rows], [r["macs_ratio"] for r in rows], color=colors[i], linestyle=":",
                label=f"{scheme}: conv3 layer, multiply-adds")
        rows = [r for r in acc if r["scheme"] == scheme]
        ax.plot([r["rank"] for r in rows], [r["model_time_ratio"] for r in rows], color=colors[i], linestyle="--",
                marker="s", label=f"{scheme}: whole CNN on the test set")
    ax.plot([p["rank"] for p in PAPER_RANKS], [p["time_ratio_vs_pytorch"] for p in PAPER_RANKS], color="black",
            marker="x", linestyle=":", label="paper: test time / PyTorch's")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("time / dense time (same process)")
    ax.set_xticks(list(ranks))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save_plot(fig, ctx.out_dir, "rankn_time.png")


def run(ctx: Context) -> Section:
    scale = "quick" if ctx.quick else "full"
    cfg, tcfg = SETTINGS[scale], train_settings(ctx)
    ranks = tuple(cfg["ranks"])
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    net = trained_cnn3(ctx.seed, tcfg["epochs"], tcfg["size"])
    train_seconds = time.perf_counter() - start
    model, data = net.model, net.data

    # errors and the converted models: small SVDs and 8x8 forwards, nothing timed (see sketching.torch_threads)
    conv = copy.deepcopy(model.get_submodule(TIME_LAYER)).to(ctx.device)
    with torch_threads(1):
        x = data.x_test[: cfg["error_batch"]]
        inputs = {name: layer_input(model, name, x) for name in LAYERS}
        svals = {(name, scheme): singular_values(model.get_submodule(name).weight, scheme)
                 for name in LAYERS for scheme in SCHEMES}
        layers = [layer_errors(name, model.get_submodule(name), inputs[name], scheme, r, svals[(name, scheme)])
                  for scheme in SCHEMES for r in ranks for name in LAYERS]
        converted = {(scheme, r): _convert(model, scheme, r).to(ctx.device) for scheme in SCHEMES for r in ranks}
        dense = copy.deepcopy(model).to(ctx.device)
        x_test, y_test = data.x_test.to(ctx.device), data.y_test.to(ctx.device)
        with torch.no_grad():
            accuracies = {key: evaluate(m, x_test, y_test, 512) for key, m in converted.items()}
        timed = {(scheme, r): LowRankConv2d.from_dense(conv, LowRankConfig(rank=r, scheme=scheme, init="fit"))
                 for scheme in SCHEMES for r in ranks}

    # Times: both arms alternately (paired_time) on TIME_THREADS threads
    x_model = x_test[: cfg["model_images"]]
    gen = torch.Generator().manual_seed(ctx.seed)
    xt = torch.randn(cfg["time_batch"], conv.in_channels, cfg["time_hw"], cfg["time_hw"], generator=gen)
    xt = xt.to(ctx.device)
    threads = TIME_THREADS or torch.get_num_threads()
    acc_rows, time_rows = [], []
    with torch_threads(threads), torch.no_grad():
        out_hw = conv(xt[:1]).shape[-2:]
        for (scheme, r), m in converted.items():
            t = paired_time(_forward_all(dense, x_model, cfg["model_batch"]),
                            _forward_all(m, x_model, cfg["model_batch"]), cfg["model_blocks"], cfg["model_rounds"])
            acc_rows.append({
                "kind": "model", "scheme": scheme, "rank": r, "accuracy": accuracies[(scheme, r)],
                "dense_accuracy": net.accuracy, "test_images": len(y_test), "timed_images": len(x_model),
                "model_batch": cfg["model_batch"], "threads": threads, "model_min_s": t["min_s"],
                "dense_model_min_s": t["dense_min_s"], "model_median_s": t["median_s"],
                "dense_model_median_s": t["dense_median_s"], "model_time_ratio": t["ratio"],
                "block_ratios": t["block_ratios"], "other_cpu_load": t["other_cpu_load"],
            })
        for (scheme, r), layer in timed.items():
            t = paired_time(lambda: conv(xt), lambda: layer(xt), cfg["blocks"], cfg["rounds"])
            time_rows.append({
                "kind": "time", "layer": TIME_LAYER, "scheme": scheme, "rank": r, "effective_rank": layer.rank,
                "input": f"{cfg['time_batch']}x{conv.in_channels}x{cfg['time_hw']}x{cfg['time_hw']}",
                "device": str(ctx.device), "threads": threads, "calls": t["calls"],
                "min_s": t["min_s"], "median_s": t["median_s"], "dense_min_s": t["dense_min_s"],
                "dense_median_s": t["dense_median_s"], "time_ratio": t["ratio"], "block_ratios": t["block_ratios"],
                "macs_ratio": layer.macs(*out_hw) / layer.dense_macs(*out_hw), "path": _path(layer, *out_hw),
                "other_cpu_load": t["other_cpu_load"],
            })

    plots = [_plot_errors(ctx, layers, acc_rows, net.accuracy, ranks), _plot_time(ctx, time_rows, acc_rows, ranks)]

    paper = {p["rank"]: p for p in PAPER_RANKS}
    acc_by = {(r["scheme"], r["rank"]): r for r in acc_rows}
    time_by = {(r["scheme"], r["rank"]): r for r in time_rows}
    main = []
    for r in ranks:
        p = paper.get(r)
        row = [r, f"{p['accuracy']:.5f}" if p else "—",
               f"{p['test_time_s']:.2f} s ({p['time_ratio_vs_pytorch']:.3f})" if p else "—"]
        for scheme in SCHEMES:
            a, t = acc_by[(scheme, r)], time_by[(scheme, r)]
            row += [f"{100 * a['accuracy']:.1f}%", f"{a['model_time_ratio']:.2f}",
                    f"{t['time_ratio']:.2f} ({t['macs_ratio']:.2f})"]
        main.append(row)
    main.append(["dense", f"{PAPER_DENSE['accuracy']:.5f}", f"{PAPER_DENSE['test_time_s']:.2f} s (1)",
                 f"{100 * net.accuracy:.1f}%", "1", "1", f"{100 * net.accuracy:.1f}%", "1", "1"])
    err_by = {(r["scheme"], r["rank"], r["layer"]): r for r in layers}
    err_table = []
    for scheme in SCHEMES:
        for r in ranks:
            c3 = err_by[(scheme, r, "conv3")]
            err_table.append(
                [scheme, r, f"{c3['effective_rank']}/{c3['full_rank']}"]
                + [f"{err_by[(scheme, r, n)]['weight_error']:.3f} / {err_by[(scheme, r, n)]['output_error']:.3f}"
                   for n in LAYERS]
                + [f"{c3['eckart_young']:.3f}", f"{c3['params_ratio']:.2f}"])
    max_ey = max(abs(r["weight_error"] - r["eckart_young"]) for r in layers)
    exact = [r for r in layers if r["scheme"] == "filter" and r["effective_rank"] == r["full_rank"]]
    time_load = max(r["other_cpu_load"] for r in time_rows + acc_rows)
    dense_ms = 1e3 * min(r["dense_min_s"] for r in time_rows)
    md = [
        f"The 3-layer CNN ({net.describe()}) with its convolutions replaced by `LowRankConv2d` at ranks "
        f"{', '.join(map(str, ranks))}, both schemes: `filter` is the paper's best rank-r approximation of every "
        f"3x3 filter slice (sec. IX), `channel` the package's r separable basis filters shared across channels. "
        f"Paper columns: "
        f"sec. XIV's average test accuracy and time to test 10,000 images (ratio to PyTorch's forward). Ours: test "
        f"accuracy ({len(y_test)} images) of the CNN with all three convolutions converted (no fine-tuning), the "
        f"time of its forward over {cfg['model_images']} test images (batch {cfg['model_batch']}) over the dense "
        f"CNN's, and the forward time of `conv3`'s trained weights (64 -> 64, 3x3) on a {time_rows[0]['input']} "
        f"input over the dense `nn.Conv2d`'s ({dense_ms:.1f} ms, {ctx.device}), with the multiply-add ratio in "
        f"parentheses. Both arms of a time ratio were timed alternately, {cfg['blocks']} blocks of "
        f"{cfg['rounds']} calls each ({cfg['model_blocks']} x {cfg['model_rounds']} for the CNN), on {threads} "
        f"thread(s); a ratio is the median over the blocks of fastest / fastest.",
        "",
        markdown_table(
            ["rank", "paper: accuracy", "paper: test time (/ PyTorch)",
             "filter: accuracy", "filter: CNN time ratio", "filter: conv3 time ratio (MACs)",
             "channel: accuracy", "channel: CNN time ratio", "channel: conv3 time ratio (MACs)"], main),
        "",
        f"Relative weight / output error of each trained convolution (output on {cfg['error_batch']} test images' "
        f"activations, bias excluded from the norm), Eckart-Young's weight error `sqrt(sum_(i>r) s_i^2) / ||W||` "
        f"(sec. IX) for conv3, and conv3's parameters over the dense layer's:",
        "",
        markdown_table(["scheme", "rank", "conv3 rank used / full"] + [f"{n} weight / output" for n in LAYERS]
                       + ["conv3 Eckart-Young", "conv3 params ratio"], err_table),
        "",
        f"Every weight error equals Eckart-Young's to {max_ey:.1e}; the filter scheme is exact at rank "
        f"min(kh, kw) = 3 (largest weight error there {max((r['weight_error'] for r in exact), default=0.0):.1e}; "
        f"ranks above are capped to 3). The timed calls ran while other processes used up to "
        f"{100 * time_load:.0f}% of the CPUs.",
        "",
        "What differs: the paper's network has two convolutions with one 5x5 filter each on 32x32 grayscale "
        "CIFAR-10 (rank 5 exact), trained 250 epochs, and its accuracy and time are averages over the epochs of "
        "its own numpy matrix-product convolution against PyTorch's forward, one image at a time; ours are "
        "multi-channel 3x3 convolutions of a digits CNN, converted once after training, with PyTorch's "
        "convolutions in both arms (the filter scheme runs one convolution with the rebuilt kernel except where its "
        "separable form saves multiply-adds, so its time stays near the dense one). The paper attributes its speed-up "
        "to its matrix-product formulation; with the same convolution routine in both arms, ours can come only from "
        "the multiply-adds a scheme removes.",
    ]
    notes = [f"{scale}: ranks {', '.join(map(str, ranks))}; {cfg['blocks'] * cfg['rounds']} timed calls per arm "
             f"and layer configuration, {cfg['model_blocks'] * cfg['model_rounds']} per CNN; training "
             f"{train_seconds:.1f} s of this section (0 when `sketching` ran first in this process: the trained CNN "
             f"is cached)"]
    if ctx.quick:
        notes.append("quick: the CNN trained on the native 8x8 digits (28x28 in --full); 64 test images timed in "
                     "one batch (all 450 one at a time in --full, as the paper fed its images)")
    training = [{"kind": "training", "network": "cnn3", "size": net.size, "epochs": net.epochs, "seed": net.seed,
                 "test_accuracy": net.accuracy, "train_seconds": net.seconds}]
    return Section(markdown="\n".join(md), rows=training + layers + acc_rows + time_rows,
                   paper=[PAPER_DENSE, *PAPER_RANKS, *PAPER_OTHER], plots=plots, notes=notes)
