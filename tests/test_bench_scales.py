"""The scales and the budget of the GPU benchmarks (``bench/conftest.py``, ``bench/gpu.py``): test counts per scale,
the trimming rule of ``--bench-budget`` as a pure function, and a dry run end to end (its records say so)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.test_active_conv2d_gpu as active_file
import bench.test_alsh_layer_gpu as alsh_file
import bench.test_hash_histogram_gpu as hash_file
import bench.test_sketch_gpu as sketch_file
from bench.gpu import STARTUP_S, CaseCost, copy_bandwidth, memory_floor_s, plan_budget, priority, scale_dtypes

REPO_ROOT = Path(__file__).resolve().parent.parent
FILES = {"hash": hash_file, "active": active_file, "sketch": sketch_file, "alsh": alsh_file}
# tests per file and scale: full is today's list (unchanged names), quick and dry as bench/README.md states
COUNTS = {
    "full": {"hash": 208, "active": 864, "sketch": 162, "alsh": 52},
    "quick": {"hash": 8, "active": 72, "sketch": 24, "alsh": 8},
    "dry": {"hash": 8, "active": 36, "sketch": 12, "alsh": 8},
}


def _params(module, scale: str) -> list[dict]:
    """Every test's parameters of a bench file at ``scale``, as its pytest_generate_tests makes them."""
    cases = module.cases_for(scale)
    dtypes = scale_dtypes(scale, module.FULL_DTYPES)
    out = []
    for case in cases:
        for dtype in dtypes:
            if module is hash_file:
                base = dict(zip(("case", "conv", "shape"), case), dtype=dtype)
                out += [{**base, "variant": v} for v in module.VARIANTS]
            elif module is active_file:
                base = dict(zip(("case", "conv", "shape"), case), dtype=dtype)
                out += [{**base, "fraction": f, "pass_": p, "variant": v} for f in module.FRACTIONS
                        for p in module.PASSES for v in module.VARIANTS]
            elif module is sketch_file:
                base = dict(zip(("case", "kind", "shape", "conv", "r", "d"), case), dtype=dtype)
                out += [{**base, "mode": m, "variant": v} for m in module.MODES for v in module.VARIANTS]
            else:
                base = dict(zip(("case", "conv", "shape"), case), dtype=dtype)
                out += [{**base, "variant": v} for v in module.VARIANTS]
    return out


@pytest.mark.parametrize("scale", list(COUNTS))
def test_case_counts_per_scale(scale):
    assert {name: len(_params(module, scale)) for name, module in FILES.items()} == COUNTS[scale]


def test_quick_layers_are_full_layers_and_dry_is_tiny():
    for module in FILES.values():
        full = {c[0] for c in module.cases_for("full")}
        assert {c[0] for c in module.cases_for("quick")} <= full
        for case in module.cases_for("dry"):
            shape = case[2]
            assert shape[0] == 2 and max(shape[1:]) <= 16
    assert scale_dtypes("quick", ("bf16", "fp32")) == ["fp16", "bf16"]
    assert scale_dtypes("dry", ("bf16",)) == ["fp16", "fp32"]  # no bf16 tl.dot in the interpreter
    assert scale_dtypes("full", ("bf16", "fp32")) == ["bf16", "fp32"]


def test_quick_estimate_stays_near_four_minutes():
    # a tripwire on the cost model's estimate (not a measured time): quick must fit one 10-minute device command
    # with room to rerun; bench/README.md states the figure
    costs = [module.bench_cost(p, "quick") for module in FILES.values() for p in _params(module, "quick")]
    plan = plan_budget(costs)
    assert not plan.dropped and plan.estimate_s == plan.total_s
    assert 180 < plan.total_s < 330, plan.total_s


def test_priority_order():
    order = [
        priority("bf16", "forward", 0.5),
        priority("fp16", "forward", 0.5),
        priority("bf16", "forward", 1.0),
        priority("bf16", "forward", 0.25),
        priority("bf16", "forward+backward", 0.5),
        priority("bf16", "forward+backward", 0.25),
        priority("fp16", "forward", 1.0),
        priority("fp16", "forward+backward", 0.25, layer=1),
    ]
    assert order == sorted(order)
    assert priority("bf16") == priority("bf16", "forward", 0.5)  # no fractions: a headline case
    assert priority("bf16", layer=0) < priority("bf16", layer=1)


def _cost(group, rank, run=1.0, *once):
    return CaseCost(group, (rank,), run, tuple(once))


def test_budget_keeps_everything_without_a_budget_and_counts_shared_costs_once():
    costs = [_cost("a", 0, 1.0, ("compile:k", 10.0)), _cost("a", 0, 1.0, ("compile:k", 10.0)),
             _cost("b", 1, 2.0, ("compile:k", 10.0), ("tune:b", 3.0))]
    plan = plan_budget(costs)
    assert plan.kept == ["a", "b"] and plan.dropped == []
    assert plan.estimate_s == plan.total_s == STARTUP_S + 1 + 1 + 10 + 2 + 3


def test_budget_drops_whole_groups_by_rank_and_goes_on():
    costs = [
        _cost("late-cheap", 3, 1.0, ("compile:k", 10.0)),  # shares the compile of "first": 1 s once it is paid
        _cost("first", 0, 1.0, ("compile:k", 10.0)),
        _cost("second", 1, 1.0, ("compile:other", 50.0)),
        _cost("second", 1, 1.0),
        _cost("third", 2, 5.0),
    ]
    plan = plan_budget(costs, STARTUP_S + 18.0)
    # first (11 s) fits; second (52 s) does not; third (5 s) fits; late-cheap (1 s: compile already paid) fits
    assert plan.kept == ["first", "third", "late-cheap"]
    assert plan.dropped == ["second"]
    assert plan.estimate_s == STARTUP_S + 17.0
    assert plan.total_s == STARTUP_S + 69.0
    assert plan_budget(costs, 0.0).kept == []


def test_quick_budget_keeps_the_headline_cases_first():
    costs = [module.bench_cost(p, "quick") for module in FILES.values() for p in _params(module, "quick")]
    plan = plan_budget(costs, 150.0)
    assert plan.estimate_s <= 150.0 and plan.dropped
    assert "active_conv2d-vgg11224-conv13-bf16-forward-f0.5" in plan.kept
    assert "active_conv2d-alexnet224-conv6-bf16-forward-f0.5" in plan.kept
    assert all("forward+backward" in g or "fwd_bwd" in g or "fp16" in g for g in plan.dropped)


def test_dispatch_table_skips_dry_records():
    from bench.dispatch_table import entries_from_records

    rec = {"op": "active_conv2d", "variant": "triton", "ratio_vs": {"torch_best": 0.5}, "dtype": "fp16",
           "shape": [2, 16, 8, 8], "weight_shape": [16, 16, 3, 3], "stride": [1, 1], "padding": [1, 1],
           "dilation": [1, 1], "pass": "forward", "fraction": 0.5}
    assert entries_from_records({"dry": {**rec, "scale": "dry"}}) == []
    assert len(entries_from_records({"dry": {**rec, "scale": "dry"}}, include_dry=True)) == 1
    (entry,) = entries_from_records({"quick": {**rec, "scale": "quick"}})
    assert entry["backend"] == "torch" and entry["scale"] == "quick"


def test_memory_floor_on_the_cpu():
    assert copy_bandwidth("cpu") > 1e8
    x = torch.empty(1024, dtype=torch.float16)
    assert memory_floor_s(x) == pytest.approx(2048 / copy_bandwidth("cpu"))


def _bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("TRITONSLIDE_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_records_say_dry(tmp_path):
    out = tmp_path / "dry.json"
    node = "bench/test_hash_histogram_gpu.py::test_hash_histogram[dry-c16-k3@8-fp16-{}]"
    run = _bench(node.format("unfused"), node.format("triton"), "--benchmark-only", "--bench-scale", "dry",
                 "--bench-results", str(out), tmp_path=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = json.loads(out.read_text())
    assert len(records) == 2 and {r["scale"] for r in records.values()} == {"dry"}
    triton = next(r for r in records.values() if r["variant"] == "triton")
    assert "unfused" in triton["ratio_vs"] and triton["device"].startswith("cpu")


def test_dry_run_refuses_the_results_folder(tmp_path):
    run = _bench("bench/test_hash_histogram_gpu.py", "--bench-scale", "dry", "--bench-results",
                 "bench/results/dry.json", "--collect-only", tmp_path=tmp_path)
    assert run.returncode == 4  # pytest's usage error
    assert "not measurements" in run.stderr
    assert not (REPO_ROOT / "bench/results/dry.json").exists()
