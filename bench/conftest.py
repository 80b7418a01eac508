"""Shared fixtures of the CPU benchmarks and the end-of-run summary (ratios against the dense baseline).

Run with ``python -m pytest bench/ --benchmark-only``; the normal ``pytest`` run (testpaths = tests) skips them.
Each benchmark stores its timings in ``config.stash``; after the run the summary pairs every ALSH variant with
the dense baseline of its group, prints the ratio and the active fractions, and updates ``bench/results/cpu.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench.gpu import gpu_environment, results_path
from bench.utils import environment, methods_markdown, update_results

# Share of the CPUs other processes may use during a benchmark before its line is flagged as not comparable.
BUSY = 0.05

RECORDS = pytest.StashKey[dict[str, dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tritonslide bench")
    group.addoption(
        "--torch-threads", type=int, default=None,
        help="torch.set_num_threads for the benchmarks (default: torch's choice, one per core)",
    )
    group.addoption(
        "--bench-results", default=None,
        help="JSON file the benchmark records are merged into (keyed by benchmark name); default "
        "bench/results/<gpu>.json on a CUDA machine, bench/results/cpu.json elsewhere",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RECORDS] = {}
    threads = config.getoption("--torch-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bench_records(pytestconfig: pytest.Config) -> dict[str, dict[str, Any]]:
    return pytestconfig.stash[RECORDS]


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    records = config.stash.get(RECORDS, {})
    if not records:
        return
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
    env = gpu_environment() if torch.cuda.is_available() else environment()
    tr = terminalreporter
    tr.section("tritonslide: methods vs nn.Conv2d (dense_mean / method_mean)")
    threads = env['torch_threads']
    tr.write_line(f"{env['device']}, {threads} thread{'s' if threads != 1 else ''}, torch {env['torch_version']}, "
                  f"commit {env['git_commit']}")
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
            if rec.get("active_fraction"):
                per_layer = ", ".join(f"{k}: {v:.3f}" for k, v in rec["active_fraction"].items())
                tr.write_line(f"            active fraction {per_layer}; mean {rec['mean_active_fraction']:.3f}")
    if any("layer" in r for r in records.values()):  # test_methods_cpu.py ran: its table, ready for the README
        tr.write_line("")
        tr.write_line("methods (time ratio dense/method, * = other processes used >5% of the CPUs):")
        for line in methods_markdown(records).splitlines():
            tr.write_line(line)
    out = config.getoption("--bench-results") or results_path()
    # Runs with an explicit thread count are kept beside the default ones instead of replacing them.
    suffix = f"@threads={env['torch_threads']}" if config.getoption("--torch-threads") else ""
    update_results(Path(out), {name + suffix: {**rec, **env} for name, rec in records.items()})
    tr.write_line(f"records written to {out}")

