"""Cold ``torch.compile`` time and eager vs compiled training-step time of a patched model, against dense.

Run from the repository root::

    python -m bench.compile [--model resnet18] [--backend inductor|aot_eager] [--methods alsh,sketch,...]
                            [--batch 8] [--image-size 64] [--steps 10] [--out bench/results/compile_cpu.json]

Each variant (``dense`` and every method, ``tritonslide.patch(model, method)``) runs in its own fresh Python
process with fresh, empty ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``, so neither an in-memory nor an
on-disk cache helps its compile. In that process:

1. cold compile: the wall time of the first training step (forward + backward) of
   ``torch.compile(model, backend=B, fullgraph=True)``, tracing and compiling included;
2. step time: after 2 warm-up steps, ``--steps`` training steps (forward, backward, SGD step) of the eager model
   and of the compiled model (a deep copy taken before compiling: same weights), interleaved, so that a drift of
   the machine's load hits both alike. Medians are reported.

Ratios are taken against dense measured in the same run (STYLE.md practice 7): ``x dense`` is patched time /
dense time and ``compiled/eager`` is compiled step / eager step (below 1: compiling helps). Records are merged
into the JSON file with the device, versions and commit (``bench.utils.environment``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

METHODS = ("alsh", "sketch", "milf", "lowrank", "csg")
BACKENDS = ("inductor", "aot_eager")
WARMUP_STEPS = 2


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="a name of tritonslide.models (default: resnet18)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--backend", default="inductor", choices=BACKENDS)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods; dense is always run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model, after 2 warm-up steps")
    p.add_argument("--threads", type=int, default=_default_threads(), help="torch threads (default: the cores)")
    p.add_argument("--no-layout-optimization", action="store_true",
                   help="torch._inductor.config.layout_optimization = False (Inductor's channels_last choice for "
                        "convolutions made dense ResNet-18 training 1.29x slower than eager on this CPU)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to one variant's process")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file the records are merged into (default: bench/results/compile_cpu.json for "
                        "inductor, bench/results/compile_cpu_<backend>.json otherwise)")
    # internal: run one variant in this process and write its record to --worker-out
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "dense"]
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------- worker


def _train_step(model: Any, opt: Any, x: Any, y: Any) -> float:
    """One training step, timed: forward, cross-entropy, backward, SGD step. Returns seconds."""
    import torch.nn.functional as F

    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    elapsed = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)
    return elapsed


def _dynamo_stats() -> dict[str, Any]:
    from torch._dynamo.utils import compilation_time_metrics, counters

    attempts = {k: len(v) for k, v in compilation_time_metrics.items() if k.startswith("compile_attempt_")}
    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "calls_captured": int(counters["stats"]["calls_captured"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        # a frame whose analysis dynamo restarted (e.g. a float it failed to tensorify) is traced again from
        # the start: compile_attempt_1 and later count those restarts
        "compile_restarts": int(sum(n for k, n in attempts.items() if k != "compile_attempt_0")),
        "aot_autograd": {k: int(v) for k, v in counters["aot_autograd"].items()},
    }


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one variant (``args.worker``: ``dense`` or a method) in this process; return its record."""
    import torch

    import tritonslide
    from bench.utils import OtherLoad, quantiles
    from tritonslide import models

    torch.set_num_threads(args.threads)
    if args.no_layout_optimization:
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    variant = args.worker
    record: dict[str, Any] = {"variant": variant, "torch_threads": torch.get_num_threads()}

    torch.manual_seed(0)
    model = models.get_model(args.model, num_classes=args.num_classes)
    record["dense_param_count"] = sum(p.numel() for p in model.parameters())
    if variant != "dense":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            tritonslide.patch(model, variant)
            record["patch_s"] = time.perf_counter() - t0
        record["patch_warnings"] = [str(w.message) for w in caught]
    record["param_count"] = sum(p.numel() for p in model.parameters())
    model.train()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen)

    eager = model
    compiled_base = copy.deepcopy(model)  # same weights, before compiling
    compiled = torch.compile(compiled_base, backend=args.backend, fullgraph=True)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9)
    opt_compiled = torch.optim.SGD(compiled_base.parameters(), lr=0.01, momentum=0.9)

    # 1. cold compile: the first forward + backward of the compiled model (tracing, AOT autograd, codegen)
    import torch.nn.functional as F

    t0 = time.perf_counter()
    out = compiled(x)
    t1 = time.perf_counter()
    loss = F.cross_entropy(out, y)
    loss.backward()
    t2 = time.perf_counter()
    record["cold_compile_s"] = t2 - t0
    record["cold_forward_s"] = t1 - t0
    record["cold_backward_s"] = t2 - t1
    record["compiled_first_loss"] = float(loss)
    opt_compiled.step()
    opt_compiled.zero_grad(set_to_none=True)
    record.update(_dynamo_stats())
    graphs_after_cold = record["unique_graphs"]

    # The eager model's first step from the same weights: a cheap check that the compiled model computes the same.
    eager_loss = F.cross_entropy(eager(x), y)
    eager_loss.backward()
    opt_eager.step()
    opt_eager.zero_grad(set_to_none=True)
    record["eager_first_loss"] = float(eager_loss)

    # 2. step time: 2 warm-up steps each, then interleaved timed steps
    record["eager_warmup_s"] = [_train_step(eager, opt_eager, x, y) for _ in range(WARMUP_STEPS)]
    record["compiled_warmup_s"] = [_train_step(compiled, opt_compiled, x, y) for _ in range(WARMUP_STEPS)]
    eager_times, compiled_times = [], []
    with OtherLoad() as load:
        for _ in range(args.steps):
            eager_times.append(_train_step(eager, opt_eager, x, y))
            compiled_times.append(_train_step(compiled, opt_compiled, x, y))
    record["other_cpu_load"] = load.value
    for name, times in (("eager", eager_times), ("compiled", compiled_times)):
        p20, p50, p80 = quantiles(times)
        record.update({f"{name}_times_s": times, f"{name}_p20_s": p20, f"{name}_p50_s": p50, f"{name}_p80_s": p80})
    record["compiled_over_eager"] = record["compiled_p50_s"] / record["eager_p50_s"]
    after = _dynamo_stats()
    # a recompilation during the timed steps shows up as a new graph (its compile time lands in one timed step)
    record["recompiles"] = after["unique_graphs"] - graphs_after_cold
    record["graph_breaks"] = after["graph_breaks"]
    return record


# --------------------------------------------------------------------------------------------------- parent


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="variant", dynamic_ncols=True)


def _say(bar, msg: str) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Run one variant in a fresh interpreter with fresh, empty compile caches; return its record."""
    with tempfile.TemporaryDirectory(prefix=f"tritonslide-compile-{variant}-") as tmp:
        env = dict(os.environ)
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        for key in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCH_COMPILE_DEBUG"):
            env.pop(key, None)
        out_path = Path(tmp) / "record.json"
        cmd = [sys.executable, "-m", "bench.compile", "--worker", variant, "--worker-out", str(out_path),
               "--model", args.model, "--num-classes", str(args.num_classes), "--backend", args.backend,
               "--batch", str(args.batch), "--image-size", str(args.image_size), "--steps", str(args.steps),
               "--threads", str(args.threads)] + (["--no-layout-optimization"] if args.no_layout_optimization else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                                  text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "error": f"timed out after {args.timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
            return {"variant": variant, "error": f"exit code {proc.returncode}", "stderr_tail": tail,
                    "process_wall_s": wall}
        record = json.loads(out_path.read_text(encoding="utf-8"))
        record["process_wall_s"] = wall
        return record


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _notes(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"error: {rec['error']}"
    notes = []
    if rec.get("graph_breaks"):
        notes.append(f"{rec['graph_breaks']} graph breaks")
    if rec.get("unique_graphs", 1) != 1:
        notes.append(f"{rec['unique_graphs']} graphs")
    if rec.get("compile_restarts"):
        notes.append(f"{rec['compile_restarts']} dynamo restart(s)")
    if rec.get("recompiles"):
        notes.append(f"{rec['recompiles']} recompile(s)")
    if (rec.get("other_cpu_load") or 0.0) > 0.05:
        notes.append(f"busy machine ({rec['other_cpu_load']:.0%} other load)")
    if rec.get("patch_warnings"):
        notes.append(f"{len(rec['patch_warnings'])} patch warning(s)")
    return "; ".join(notes)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Rows: dense then the methods. Time ratios: patched / dense (x dense) and compiled / eager."""
    header = ("| variant | cold compile (s) | compile x dense | eager step (ms) | eager x dense | compiled step (ms) "
              "| compiled x dense | compiled/eager | notes |")
    lines = [header, "|" + "---|" * 9]
    for r in records:
        lines.append("| " + " | ".join([
            f"`{r['variant']}`",
            _fmt(r.get("cold_compile_s"), ".1f"),
            _fmt(r.get("compile_ratio_vs_dense"), ".2f"),
            _fmt(None if "eager_p50_s" not in r else 1e3 * r["eager_p50_s"], ".1f"),
            _fmt(r.get("eager_ratio_vs_dense"), ".2f"),
            _fmt(None if "compiled_p50_s" not in r else 1e3 * r["compiled_p50_s"], ".1f"),
            _fmt(r.get("compiled_ratio_vs_dense"), ".2f"),
            _fmt(r.get("compiled_over_eager"), ".2f"),
            _notes(r),
        ]) + " |")
    return "\n".join(lines)


def run_parent(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from bench.utils import RESULTS_DIR, environment, update_results

    torch.set_num_threads(args.threads)
    out = args.out
    if out is None:
        suffix = "" if args.backend == "inductor" else f"_{args.backend}"
        out = RESULTS_DIR / f"compile_cpu{suffix}{'_nolayout' if args.no_layout_optimization else ''}.json"
    env = environment()
    try:
        import triton

        env["triton_version"] = triton.__version__
    except ImportError:
        env["triton_version"] = None
    if args.backend == "inductor":
        import torch._inductor.config as inductor_config

        env["inductor_compile_threads"] = inductor_config.compile_threads
    group = f"{args.model}-b{args.batch}-{args.image_size}px-fp32-train-{args.backend}" + (
        "-nolayoutopt" if args.no_layout_optimization else "")
    config = {"model": args.model, "num_classes": args.num_classes, "backend": args.backend, "batch": args.batch,
              "image_size": args.image_size, "steps": args.steps, "warmup_steps": WARMUP_STEPS,
              "optimizer": "SGD(lr=0.01, momentum=0.9)", "loss": "cross_entropy", "fullgraph": True,
              "inductor_layout_optimization": not args.no_layout_optimization}
    print(f"bench.compile: {group}, {args.threads} threads, {env['device']}, torch {env['torch_version']}, "
          f"triton {env['triton_version']}, commit {env['git_commit']}", flush=True)

    variants = ["dense", *args.methods]
    bar = _progress(len(variants))
    records: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for variant in variants:
        if bar is not None:
            bar.set_description(variant)
        rec = _run_variant(args, variant)
        records.append(rec)
        if "error" in rec:
            _say(bar, f"{variant}: ERROR {rec['error']}\n{rec.get('stderr_tail', '')}")
        else:
            notes = _notes(rec)
            _say(bar, f"{variant}: cold compile {rec['cold_compile_s']:.1f} s, "
                      f"eager {1e3 * rec['eager_p50_s']:.1f} ms, compiled {1e3 * rec['compiled_p50_s']:.1f} ms, "
                      f"process {rec['process_wall_s']:.0f} s" + (f" [{notes}]" if notes else ""))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    total_s = time.perf_counter() - t_start

    dense = records[0] if "error" not in records[0] else None
    for rec in records:
        if dense is None or "error" in rec:
            continue
        rec["compile_ratio_vs_dense"] = rec["cold_compile_s"] / dense["cold_compile_s"]
        rec["eager_ratio_vs_dense"] = rec["eager_p50_s"] / dense["eager_p50_s"]
        rec["compiled_ratio_vs_dense"] = rec["compiled_p50_s"] / dense["compiled_p50_s"]

    table = markdown_table(records)
    print()
    print(f"{group}, {args.threads} threads, median of {args.steps} steps; ratios: patched / dense time, "
          f"compiled / eager time")
    print()
    print(table)
    print()
    print(f"total {total_s:.0f} s")

    to_save = {}
    for rec in records:
        # the worker's own figures (e.g. its torch_threads) win over the parent's
        full = {**env, **config, "group": group, "compare_to": "dense", "run_total_s": total_s, **rec}
        to_save[f"bench/compile.py::{group}::{rec['variant']}"] = full
    update_results(out, to_save)
    print(f"records merged into {out}")
    return records


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.worker is not None:
        record = run_worker(args)
        args.worker_out.write_text(json.dumps(record), encoding="utf-8")
        return 0
    records = run_parent(args)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
