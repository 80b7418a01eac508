"""Section ``methods``: every tritonslide method on one trained network.

A small digits CNN is trained dense, then a copy is converted with each method (``tritonslide.patch(model,
config)``: the method's default config, seeded from the run's seed, the default filter that keeps the first
convolution dense, ``init="auto"``, which fits the trained weights) and fine-tuned for as many epochs as the dense
net trained, with the same optimizer (Adam, lr 1e-3, cross-entropy: CNN-SLIDE sec. 5) and the same batch order. The
dense row is a copy of the trained net fine-tuned the same way, so every row has seen the same number of steps; the
nets fine-tune in turns, one step each per batch, so their step times meet the same machine load. This extends
``tritonslide.demo.convert_and_finetune`` (which keeps no step times and works on the 8x8 net only) with step times,
multiply-adds and a choice of network.

Per method: test accuracy right after conversion and after fine-tuning, the relative error of the test logits right
after conversion, trainable parameters, multiply-adds per sample, and the median training-step time over the
fine-tuning steps, with its ratio to the dense row's.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

import tritonslide
from tritonslide._registry import METHODS as METHOD_SPECS
from tritonslide._registry import is_tritonslide_layer
from tritonslide.compare import Context, Section
from tritonslide.compare._common import (
    DigitsSplit,
    cnn3,
    digits28,
    evaluate,
    markdown_table,
    param_count,
    pyplot,
    save_plot,
    train,
)
from tritonslide.demo import CONVERT_METHODS, load_digits_split, three_layer_cnn

METHODS: tuple[str, ...] = CONVERT_METHODS  # alsh, sketch, milf, lowrank, csg

# name -> (data loader(seed), network constructor, description)
NETS: dict[str, tuple[Callable[[int], DigitsSplit], Callable[[], nn.Module], str]] = {
    "demo_cnn_8x8": (load_digits_split, three_layer_cnn,
                     "the demo's 3-layer CNN (convs 32-64-64) on scikit-learn's 8x8 digits"),
    "cnn3_28x28": (digits28, cnn3, "`cnn3` (convs 32-64-64) on the digits upscaled to 28x28"),
}


@dataclass(frozen=True)
class Scale:
    """``net``: a key of :data:`NETS`; ``epochs``: dense training, and again fine-tuning per method."""

    net: str
    epochs: int
    batch_size: int = 64


# quick: the 8x8 net. cnn3 at 28x28 took 0.25-0.47 s per step at one thread on the 2-core dev CPU (6-15 s an epoch
# of 22 steps), too slow for 6 trainings in 30 s; the 8x8 net takes 30-55 ms a step, ~1 s an epoch.
QUICK = Scale(net="demo_cnn_8x8", epochs=3)
FULL = Scale(net="cnn3_28x28", epochs=12)
# Step times at one thread: these layers are small (batch 64 of 8x8 or 28x28), where a second thread mostly adds
# synchronization, and on a shared 2-core machine a 2-thread step took 0.6-0.7 s against 36 ms at one (8x8, dense).
# None keeps torch's setting.
THREADS: int | None = 1

# The papers' figures quoted beside ours (None: the paper makes no such claim). Ratios: method / dense for time,
# dense / method for parameters; accuracy change in points against the paper's own dense network.
PAPER_CLAIMS: dict[str, dict[str, Any]] = {
    "alsh": {
        "source": "Feeney 2019 Table 5.4 (paper 001): train-and-replace, all convs but the first, CIFAR-10",
        "time_ratio": None, "accuracy_change_points": round(87.02 - 92.52, 2), "params_ratio": None,
        "claim": "AlexNet 92.52% -> 87.02%, VGG-11 94.58% -> 88.69%; inference 1.61x / 1.37x faster (Table 5.1)",
    },
    "sketch": {
        "source": "CNN-SLIDE sec. 5 (paper 000): sketching alone; Kasiviswanathan et al. sec. 5 (paper 004)",
        "time_ratio": None, "accuracy_change_points": -2.5, "params_ratio": None,
        "claim": "about 2-3% accuracy drop (CNN-SLIDE); compression rate 0.15 with accuracy close to the "
                 "original, -2 to +4 points (tensor sketching, NinN)",
    },
    "milf": {
        "source": "CNN-SLIDE abstract, sec. 5, conclusion (paper 000): sketch + LSH vs vanilla",
        "time_ratio": 0.70, "accuracy_change_points": -5.0, "params_ratio": None,
        "claim": "about 30% less training time at about 5 points of accuracy (AlexNet: ~29%, ~5%)",
    },
    "lowrank": {
        "source": "Jaladi sec. XV (paper 002): rank-3 of 5x5 filters vs PyTorch, inference, grayscale CIFAR-10",
        "time_ratio": 0.90, "accuracy_change_points": -2.0, "params_ratio": None,
        "claim": "rank 3: ~10% faster with ~2 points lost; rank 4: ~5% faster, 0.5 points",
    },
    "csg": {
        "source": "Omidvar et al. Table 1 (paper 003): ResNet-56-CSG-[16,16,3,3]-128, CIFAR-10",
        "time_ratio": None, "accuracy_change_points": round(-(7.04 - 6.12), 2),
        "params_ratio": 853018 / 347162,
        "claim": "853,018 -> 347,162 parameters (2.45x), test error 6.12% -> 7.04%",
    },
}


def _config(method: str, seed: int):
    """The method's default config with its random choices seeded from the run's ``seed`` (same as the defaults
    at seed 0)."""
    config = METHOD_SPECS[method].config_cls()
    if isinstance(config, tritonslide.MILFConfig):
        return dataclasses.replace(config, sketch=dataclasses.replace(config.sketch, seed=seed),
                                   alsh=dataclasses.replace(config.alsh, seed=seed))
    if any(f.name == "seed" for f in dataclasses.fields(config)):
        return dataclasses.replace(config, seed=seed)
    return config


@torch.no_grad()
def macs_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds per sample of one eval-mode forward of ``model`` on the real batch ``x``: dense ``nn.Conv2d`` /
    ``nn.Linear`` as ``tritonslide.summary`` counts them, tritonslide layers by their own ``macs`` (ALSH and MILF at
    the active sets this batch selects; CSG without generating its kernel, which is once per forward).

    Not ``tritonslide.summary`` itself: it draws a standard-normal input, and the ALSH layers' active sets, hence
    their cost, depend on the input's statistics. The model's mode is restored; ALSH running statistics change."""
    total = [0]

    def hook(module: nn.Module, args, out: torch.Tensor) -> None:
        if is_tritonslide_layer(module):
            if getattr(type(module), "replaces", None) is nn.Linear:
                h, w = (out[0].numel() // out.shape[-1] if out.dim() > 1 else 1), 1
            else:
                h, w = out.shape[-2], out.shape[-1]
            total[0] += module.macs(h, w)
        elif isinstance(module, nn.Conv2d):
            total[0] += module.weight.numel() * out.shape[-2] * out.shape[-1]
        else:  # nn.Linear: one weight multiply per output position and feature
            total[0] += module.weight.numel() * (out[0].numel() // out.shape[-1] if out.dim() > 1 else 1)

    hooks, inside = [], set()
    for name, module in model.named_modules():
        if name in inside:
            continue
        if is_tritonslide_layer(module):  # a shared generator inside a CSG layer is part of that layer's cost
            inside.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
        if is_tritonslide_layer(module) or type(module) in (nn.Conv2d, nn.Linear):
            hooks.append(module.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return total[0]


def finetune_interleaved(models: dict[str, nn.Module], data: DigitsSplit, *, epochs: int, batch_size: int,
                         seed: int, progress: bool) -> dict[str, list[float]]:
    """Train every model in ``models`` as ``tritonslide.demo.train`` does (its own Adam, lr 1e-3, cross-entropy,
    the batch order that ``seed`` gives, the same for all), but taking turns step by step: the dense step and each
    method's step of the same batch run within milliseconds of each other, so a change in the machine's load hits
    every row alike instead of whichever model was training then. Who goes first rotates every step. Returns each
    model's step times (zero_grad, forward, backward, Adam step; ``time.perf_counter``)."""
    import time

    import torch.nn.functional as F
    from tqdm.auto import tqdm

    n = len(data.y_train)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    order_gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for m in models.values():
        m.train()
    bar = tqdm(total=epochs * -(-n // batch_size), desc="fine-tune", unit="step", disable=not progress)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order_gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            for name in names[step % len(names):] + names[: step % len(names)]:
                model, optimizer = models[name], optimizers[name]
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                times[name].append(time.perf_counter() - t0)
            step += 1
            bar.update(1)
    bar.close()
    return times


def measure(ctx: Context, scale: Scale) -> tuple[list[dict[str, Any]], list[str]]:
    """Train dense, convert a copy with every method, fine-tune them all (:func:`finetune_interleaved`); one row per
    method (``dense`` first) and the warnings that ``patch`` gave. Runs on the CPU at :data:`THREADS` threads
    (restored afterwards)."""
    from tritonslide._benchtools import OtherLoad

    load, make_net, _ = NETS[scale.net]
    previous_threads = torch.get_num_threads()
    if THREADS is not None:
        torch.set_num_threads(THREADS)
    notes: list[str] = []
    try:
        data = load(ctx.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            dense = make_net()
        pretrain = train(dense, data, epochs=scale.epochs, batch_size=scale.batch_size, seed=ctx.seed,
                         progress=ctx.progress, desc="dense")
        trained_accuracy = evaluate(dense, data.x_test, data.y_test, scale.batch_size)
        with torch.no_grad():
            dense.eval()
            reference = dense(data.x_test)
        models: dict[str, nn.Module] = {}
        rows: list[dict[str, Any]] = []
        for method in ("dense", *METHODS):
            model = copy.deepcopy(dense)
            patch_warnings: list[str] = []
            if method != "dense":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model = tritonslide.patch(model, _config(method, ctx.seed))
                patch_warnings = [str(w.message) for w in caught]
                notes += [f"{method}: {m}" for m in patch_warnings]
            converted = [n for n, m in model.named_modules() if is_tritonslide_layer(m)]
            accuracy_converted = evaluate(model, data.x_test, data.y_test, scale.batch_size)
            with torch.no_grad():
                output_error = float((model(data.x_test) - reference).norm() / reference.norm())
            models[method] = model
            rows.append({
                "method": method, "net": scale.net, "epochs": scale.epochs, "batch_size": scale.batch_size,
                "threads": torch.get_num_threads(), "converted_layers": ", ".join(converted) or None,
                "config": None if method == "dense" else str(_config(method, ctx.seed).to_dict()),
                "params": param_count(model), "output_error": output_error, "accuracy_converted": accuracy_converted,
                "pretrain_step_ms_median": 1e3 * statistics.median(pretrain) if method == "dense" else None,
                "trained_accuracy": trained_accuracy if method == "dense" else None,
                "patch_warnings": "; ".join(patch_warnings) or None,
            })
        # seed + 1: a batch order other than the pre-training's, the same for every row
        with OtherLoad() as other:
            steps = finetune_interleaved(models, data, epochs=scale.epochs, batch_size=scale.batch_size,
                                         seed=ctx.seed + 1, progress=ctx.progress)
        for row in rows:
            model, times = models[row["method"]], steps[row["method"]]
            row.update({
                "accuracy": evaluate(model, data.x_test, data.y_test, scale.batch_size),
                "macs_per_sample": macs_per_sample(model, data.x_test[: scale.batch_size]),
                "steps": len(times), "step_ms_median": 1e3 * statistics.median(times),
                "step_ms_mean": 1e3 * statistics.fmean(times), "other_cpu_load": other.value,
            })
    finally:
        torch.set_num_threads(previous_threads)
    base = rows[0]
    for row in rows:
        row["step_ratio"] = row["step_ms_median"] / base["step_ms_median"]
        row["params_ratio"] = base["params"] / row["params"]
        row["macs_ratio"] = base["macs_per_sample"] / row["macs_per_sample"]
        row["accuracy_change_points"] = 100 * (row["accuracy"] - base["accuracy"])
    return rows, notes


def paper_rows() -> list[dict[str, Any]]:
    return [{"method": method, **claim} for method, claim in PAPER_CLAIMS.items()]


def _plot(ctx: Context, rows: list[dict[str, Any]]) -> str:
    import numpy as np

    plt = pyplot()
    names = [r["method"] for r in rows]
    xs = np.arange(len(rows))
    fig, (ax_acc, ax_time, ax_cost) = plt.subplots(1, 3, figsize=(14, 4.2))
    ax_acc.bar(xs - 0.2, [100 * r["accuracy_converted"] for r in rows], 0.4, color="tab:gray",
               label="right after conversion")
    ax_acc.bar(xs + 0.2, [100 * r["accuracy"] for r in rows], 0.4, color="tab:blue", label="after fine-tuning")
    ax_acc.set_ylabel("test accuracy %")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title("accuracy (dense: trained, then trained as long again)", fontsize=9)
    ax_acc.legend(fontsize=7, loc="lower left")

    ax_time.bar(xs, [r["step_ratio"] for r in rows], 0.6, color="tab:orange", label="ours (median step)")
    claimed = [(x, PAPER_CLAIMS[r["method"]]["time_ratio"]) for x, r in zip(xs, rows)
               if PAPER_CLAIMS.get(r["method"], {}).get("time_ratio") is not None]
    if claimed:
        ax_time.bar([x + 0.3 for x, _ in claimed], [c for _, c in claimed], 0.25, color="lightgray",
                    edgecolor="black", hatch="//", label="paper's claim (own network; see table)")
    ax_time.axhline(1.0, color="black", linewidth=0.8)
    ax_time.set_ylabel("training step time / dense")
    ax_time.set_title("training step time vs dense (same run)", fontsize=9)
    ax_time.legend(fontsize=7)

    ax_cost.bar(xs - 0.2, [1 / r["params_ratio"] for r in rows], 0.4, color="tab:green", label="parameters")
    ax_cost.bar(xs + 0.2, [1 / r["macs_ratio"] for r in rows], 0.4, color="tab:purple",
                label="multiply-adds / sample")
    ax_cost.axhline(1.0, color="black", linewidth=0.8)
    ax_cost.set_ylabel("method / dense")
    ax_cost.set_title("cost vs dense", fontsize=9)
    ax_cost.legend(fontsize=7)
    for ax in (ax_acc, ax_time, ax_cost):
        ax.set_xticks(xs)
        ax.set_xticklabels(names, fontsize=8)
    fig.suptitle(f"Every method on one trained network ({rows[0]['net']}, {rows[0]['epochs']} + "
                 f"{rows[0]['epochs']} epochs)", fontsize=10)
    return save_plot(fig, ctx.out_dir, "methods_accuracy_time.png")


def _markdown(ctx: Context, rows: list[dict[str, Any]], scale: Scale) -> str:
    header = ["method", "params", "params dense / method", "MACs / sample", "MACs dense / method",
              "logit error after conversion", "acc % after conversion", "acc % after fine-tuning",
              "vs dense (points)", "step ms (median)", "step time / dense", "paper: time / dense",
              "paper: accuracy change (points)", "paper: params dense / method"]

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    table = []
    for r in rows:
        claim = PAPER_CLAIMS.get(r["method"], {})
        table.append([
            r["method"], f"{r['params']:,}", f"{r['params_ratio']:.2f}x", f"{r['macs_per_sample']:,}",
            f"{r['macs_ratio']:.2f}x", f"{r['output_error']:.3f}", f"{100 * r['accuracy_converted']:.1f}",
            f"{100 * r['accuracy']:.1f}", f"{r['accuracy_change_points']:+.1f}", f"{r['step_ms_median']:.1f}",
            f"{r['step_ratio']:.2f}", num(claim.get("time_ratio"), ".2f"),
            num(claim.get("accuracy_change_points"), "+.1f"),
            "-" if claim.get("params_ratio") is None else f"{claim['params_ratio']:.2f}x",
        ])
    claims = markdown_table(["method", "paper's claim", "source"],
                            [[m, c["claim"], c["source"]] for m, c in PAPER_CLAIMS.items()])
    dense = rows[0]
    _, _, description = NETS[scale.net]
    bigger = [r for r in rows[1:] if r["params"] > dense["params"]]
    size_note = "".join(
        f" {r['method']} has {r['params'] / dense['params']:.1f}x the dense parameters here: its shared generator "
        "alone is larger than this net's converted convolutions (the paper's 2.45x is on ResNet-56's 0.85M)."
        for r in bigger if r["method"] == "csg")
    load = dense.get("other_cpu_load")
    busy = (f" (other processes used {load:.0%} of the machine's CPUs meanwhile: absolute times are inflated)"
            if load is not None and load > 0.05 else "")
    faster = [r["method"] for r in rows[1:] if r["step_ratio"] < 1]
    slower = [r["method"] for r in rows[1:] if r["step_ratio"] >= 1]
    return "\n".join([
        f"{description}: trained dense for {scale.epochs} epoch(s) (batch {scale.batch_size}, Adam lr 1e-3, "
        f"seed {ctx.seed}; {100 * dense['trained_accuracy']:.1f}% test accuracy), then a copy converted with each "
        "method's default config (`tritonslide.patch`: first conv dense, `init=\"auto\"` fits the trained weights) "
        f"and fine-tuned {scale.epochs} more epoch(s) with the same optimizer and batch order; the dense row is the "
        "trained net trained as long again. Step time: median over the fine-tuning steps (zero_grad, forward, "
        f"backward, Adam step) at {dense['threads']} CPU thread(s); the {len(rows)} nets fine-tune in turns, step by "
        f"step, so that every row meets the same machine load{busy}. MACs: multiply-adds per sample of one eval "
        f"forward on {scale.batch_size} test images after fine-tuning (ALSH and MILF at that batch's active sets). The "
        "papers' columns are their own networks' figures (next table), not this net's.",
        "",
        markdown_table(header, table),
        "",
        claims,
        "",
        f"Measured here: step time below dense for {', '.join(faster) or 'no method'}, at or above it for "
        f"{', '.join(slower) or 'no method'}. What differs: the papers trained MNIST / CIFAR-10 networks (AlexNet, "
        "VGG, ResNet-56, NinN) for far longer and most timed on other hardware (the Rank-N figures are numpy "
        "inference, CSG's are parameter counts); here a 3-conv net on the bundled digits, converted after training "
        "rather than trained with the method from the start (CNN-SLIDE, CSG sec. 4.2, sketching) or replaced layer "
        "by layer (Feeney's train-and-replace), on a CPU where layers this small are dominated by per-op overhead, "
        "so the step times say little about the methods' large-layer speed." + size_note,
    ])


def run(ctx: Context) -> Section:
    """Train the digits CNN dense, convert it with every method, fine-tune, and compare with the papers."""
    scale = QUICK if ctx.quick else FULL
    rows, patch_notes = measure(ctx, scale)
    plot = _plot(ctx, rows)
    notes = [f"{ctx.scale}: {NETS[scale.net][2]}, {scale.epochs} + {scale.epochs} epochs"
             + (" (full: cnn3 at 28x28, 12 + 12 epochs)" if ctx.quick else "")]
    if ctx.device.type != "cpu":
        notes.append(f"ran on the CPU, not {ctx.device}: `train` times steps without synchronizing a GPU, and batches "
                     "of 64 digits would time kernel launches")
    notes += sorted(set(patch_notes))
    return Section(markdown=_markdown(ctx, rows, scale), rows=rows, paper=paper_rows(), plots=[plot], notes=notes)


__all__ = ["FULL", "METHODS", "NETS", "PAPER_CLAIMS", "QUICK", "Scale", "macs_per_sample", "measure",
           "paper_rows", "run"]
