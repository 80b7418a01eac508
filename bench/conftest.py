"""Shared fixtures of the benchmarks, the scale and budget options of the GPU ones, and the end-of-run summary
(ratios against the dense baseline).

Run with ``python -m pytest bench/ --benchmark-only``; the normal ``pytest`` run (testpaths = tests) skips them.
Each benchmark stores its timings in ``config.stash``; after the run the summary pairs every ALSH variant with
the dense baseline of its group, prints the ratio and the active fractions, and updates ``bench/results/cpu.json``
(``bench/results/<gpu>.json`` on a CUDA machine, ``--bench-results`` when given).

GPU benchmarks (``bench/test_*_gpu.py``) take ``--bench-scale full|quick|dry`` and ``--bench-budget SECONDS``
(bench/README.md, "GPU benchmarks"; the cost model and the trimming rule are in ``bench/gpu.py``). A dry run writes
its records, marked ``"scale": "dry"``, to ``--bench-results`` or else to ``$TMPDIR/tritonslide-bench-dry.json``,
never into ``bench/results/``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.gpu import SCALES, bench_scale, gpu_environment, plan_budget, results_path, scale_device
from bench.utils import RESULTS_DIR, environment, methods_markdown, update_results

# Share of the CPUs other processes may use during a benchmark before its line is flagged as not comparable.
BUSY = 0.05

RECORDS = pytest.StashKey[dict[str, dict[str, Any]]]()
# (groups dropped by --bench-budget, estimate of the kept cases, estimate of all, budget)
TRIMMED = pytest.StashKey[tuple[list[str], float, float, float]]()
DRY_RESULTS = Path(tempfile.gettempdir()) / "tritonslide-bench-dry.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tritonslide bench")
    group.addoption(
        "--torch-threads", type=int, default=None,
        help="torch.set_num_threads for the benchmarks (default: torch's choice, one per core)",
    )
    group.addoption(
        "--bench-results", default=None,
        help="JSON file the benchmark records are merged into (keyed by benchmark name); default "
        "bench/results/<gpu>.json on a CUDA machine, bench/results/cpu.json elsewhere; with --bench-scale dry "
        f"{DRY_RESULTS}, and never a file in bench/results/",
    )
    group.addoption(
        "--bench-scale", choices=SCALES, default="full",
        help="GPU benchmarks: full (every case), quick (a few representative layers, fp16 and bf16, 10 rounds: "
        "about 4 minutes for the four files on an H100) or dry (quick's code paths on the CPU in Triton's "
        "interpreter, tiny shapes, 1 round: records marked scale=dry, not measurements)",
    )
    group.addoption(
        "--bench-budget", type=float, default=None, metavar="SECONDS",
        help="GPU benchmarks, full or quick: drop the lowest-priority case groups until the estimated time (cost "
        "model of bench/gpu.py) fits, and run the kept ones highest priority first; the dropped groups are listed "
        "at the end (ignored by dry)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RECORDS] = {}
    threads = config.getoption("--torch-threads", default=None)
    if threads:
        torch.set_num_threads(threads)
    if bench_scale(config) != "dry":
        return
    out = config.getoption("--bench-results", default=None)
    if out and Path(out).resolve().is_relative_to(RESULTS_DIR.resolve()):
        raise pytest.UsageError(f"--bench-scale dry: its records are not measurements; not writing them to {out}")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        # Triton reads the variable when a kernel is decorated: too late once a kernel file is imported.
        if any(name.startswith("tritonslide.kernels.") for name in sys.modules):
            raise pytest.UsageError("--bench-scale dry runs the kernels in Triton's interpreter: "
                                    "set TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def bench_records(pytestconfig: pytest.Config) -> dict[str, dict[str, Any]]:
    return pytestconfig.stash[RECORDS]


@pytest.fixture(scope="session")
def bench_scale_name(pytestconfig: pytest.Config) -> str:
    """``--bench-scale`` of the run."""
    return bench_scale(pytestconfig)


@pytest.fixture
def bench_device(bench_scale_name: str) -> torch.device:
    """Where a GPU benchmark runs: CUDA (skipped without), the CPU for ``--bench-scale dry``."""
    if bench_scale_name != "dry" and not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs CUDA (--bench-scale dry runs its code paths on the CPU)")
    return scale_device(bench_scale_name)


def _case_costs(config: pytest.Config, items: list[pytest.Item]) -> list[tuple[pytest.Item, Any]]:
    """(item, CaseCost) of every GPU benchmark item: the test modules that define ``bench_cost``."""
    scale = bench_scale(config)
    costs = []
    for item in items:
        module = getattr(item, "module", None)
        cost_of = getattr(module, "bench_cost", None)
        if cost_of is not None and hasattr(item, "callspec"):
            costs.append((item, cost_of(item.callspec.params, scale)))
    return costs


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    budget = config.getoption("--bench-budget", default=None)
    if budget is None or bench_scale(config) == "dry":
        return
    costs = _case_costs(config, items)
    plan = plan_budget([c for _, c in costs], budget)
    dropped = set(plan.dropped)
    deselected = [item for item, cost in costs if cost.group in dropped]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        gone = {id(item) for item in deselected}
        items[:] = [item for item in items if id(item) not in gone]
    # The kept groups run in the plan's order (highest priority first, a group's variants together), so that a run
    # stopped early (timeout -s INT: the summary still writes the records of the tests done) has the headline cases.
    order = {group: i for i, group in enumerate(plan.kept)}
    group_of = {id(item): cost.group for item, cost in costs}
    slots = [i for i, item in enumerate(items) if id(item) in group_of]
    ranked = sorted((items[i] for i in slots), key=lambda item: order[group_of[id(item)]])  # stable within a group
    for i, item in zip(slots, ranked):
        items[i] = item
    config.stash[TRIMMED] = (plan.dropped, plan.estimate_s, plan.total_s, budget)


def pytest_report_collectionfinish(config: pytest.Config, start_path, items: list[pytest.Item]) -> list[str]:
    costs = _case_costs(config, items)
    scale = bench_scale(config)
    if not costs or scale == "dry":
        return []
    plan = plan_budget([c for _, c in costs])
    return [f"tritonslide GPU benchmarks, scale {scale}: {len(costs)} tests in {len(plan.kept)} groups, estimated "
            f"{plan.estimate_s / 60:.1f} min on one H100 with a cold Triton cache (cost model: bench/gpu.py)"]


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def _report_trimmed(tr, config: pytest.Config) -> None:
    trimmed = config.stash.get(TRIMMED, None)
    if trimmed is None:
        return
    dropped, estimate, total, budget = trimmed
    tr.section("tritonslide: --bench-budget")
    tr.write_line(f"budget {budget:.0f} s: kept cases estimated at {estimate:.0f} s of {total:.0f} s for all; "
                  f"{len(dropped)} group{'s' if len(dropped) != 1 else ''} dropped" + (":" if dropped else ""))
    for group in dropped:
        tr.write_line(f"  {group}")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    _report_trimmed(terminalreporter, config)
    records = config.stash.get(RECORDS, {})
    if not records:
        return
    scale = bench_scale(config)
    if scale == "dry":  # the GPU files record their scale; a dry run marks every record, none is a measurement
        for rec in records.values():
            rec["scale"] = "dry"
    # Ratios are computed here, once every benchmark of a group has run: dense and ALSH of the same session.
    # Records without timings are the "n/a" rows of test_methods_cpu.py (a layer that cannot be built).
    timed = {name: r for name, r in records.items() if "mean_s" in r}
    baselines = {r["group"]: r for r in timed.values() if r["variant"] == "dense"}
    by_variant = {(r["group"], r["variant"]): r for r in timed.values()}
    for rec in timed.values():
        # GPU records name their baselines (dense cuDNN, the best torch-only path, the memory floor, ...)
        for other in rec.get("compare_to", ()):
            base = by_variant.get((rec["group"], other))
            if base is not None:
                rec.setdefault("ratio_vs", {})[other] = base["p50_s"] / rec["p50_s"]
        base = baselines.get(rec["group"])
        if rec["variant"] != "dense" and base is not None:
            rec["dense_mean_s"] = base["mean_s"]
            rec["speedup_mean"] = base["mean_s"] / rec["mean_s"]
            rec["speedup_median"] = base["p50_s"] / rec["p50_s"]
            loads = [r.get("other_cpu_load") for r in (rec, base) if r.get("other_cpu_load") is not None]
            rec["pair_other_cpu_load"] = max(loads) if loads else None
    env = gpu_environment() if torch.cuda.is_available() and scale != "dry" else environment()
    tr = terminalreporter
    tr.section("tritonslide: methods vs nn.Conv2d (dense_mean / method_mean)")
    threads = env['torch_threads']
    tr.write_line(f"{env['device']}, {threads} thread{'s' if threads != 1 else ''}, torch {env['torch_version']}, "
                  f"commit {env['git_commit']}")
    if scale == "dry":
        tr.write_line("DRY RUN (--bench-scale dry): tiny shapes on the CPU, kernels in Triton's interpreter; "
                      "the times below are not measurements")
    for group in sorted({r["group"] for r in timed.values()}):
        tr.write_line(f"{group}:")
        for name, rec in timed.items():
            if rec["group"] != group:
                continue
            line = (f"  {rec['variant']:18s} mean {_fmt_ms(rec['mean_s'])}  p20/p50/p80 "
                    f"{rec['p20_s'] * 1e3:.1f}/{rec['p50_s'] * 1e3:.1f}/{rec['p80_s'] * 1e3:.1f} ms")
            if rec.get("ratio_vs"):
                line += "  " + ", ".join(f"{v:.2f}x vs {k}" for k, v in rec["ratio_vs"].items())
            elif "speedup_mean" in rec:
                line += f"  ratio {rec['speedup_mean']:.2f}x (medians {rec['speedup_median']:.2f}x)"
            load = rec.get("pair_other_cpu_load", rec.get("other_cpu_load"))
            if load is not None and load > BUSY:
                line += f"  [other processes used up to {load:.0%} of the CPUs: not comparable]"
            tr.write_line(line)
            fraction = rec.get("active_fraction")
            if isinstance(fraction, dict) and fraction:  # per layer of a model (CPU benchmarks)
                per_layer = ", ".join(f"{k}: {v:.3f}" for k, v in fraction.items())
                tr.write_line(f"            active fraction {per_layer}; mean {rec['mean_active_fraction']:.3f}")
            elif fraction is not None:  # one layer (test_alsh_layer_gpu.py)
                tr.write_line(f"            active fraction {fraction:.3f}")
    # test_methods_cpu.py's records (a layer and a mode; the GPU files' records have one or the other): its table
    methods = {name: r for name, r in records.items() if "layer" in r and "mode" in r}
    if methods:
        tr.write_line("")
        tr.write_line("methods (time ratio dense/method, * = other processes used >5% of the CPUs):")
        for line in methods_markdown(methods).splitlines():
            tr.write_line(line)
    out = config.getoption("--bench-results") or (DRY_RESULTS if scale == "dry" else results_path())
    # Runs with an explicit thread count are kept beside the default ones instead of replacing them.
    suffix = f"@threads={env['torch_threads']}" if config.getoption("--torch-threads") else ""
    update_results(Path(out), {name + suffix: {**rec, **env} for name, rec in records.items()})
    tr.write_line(f"records written to {out}")

